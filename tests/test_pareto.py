"""Multi-objective searches: the Pareto front and the selection rule, unit and end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calotune.spec import SPACES_DIR
from calotune.tuning.pareto import pareto_front, select
from tests.helpers import mlflow_client, registered_name, run_cli, trial_runs

POINTS = [(0.10, 5.0), (0.20, 1.0), (0.15, 2.0), (0.30, 3.0), (0.12, 4.0)]
MODES = ("min", "min")
NAMES = ("sep", "ms")


def test_front_hand_computed() -> None:
    # (0.30, 3.0) is dominated by (0.15, 2.0); every other point trades one for the other.
    assert pareto_front(POINTS, MODES) == [0, 1, 2, 4]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], MODES) == [0, 1], "equal points do not dominate"
    assert pareto_front([(1.0, 5.0), (2.0, 9.0)], ("min", "max")) == [0, 1]


def test_selection_rules() -> None:
    assert select(POINTS, MODES, NAMES, "first") == 0
    assert select(POINTS, MODES, NAMES, "ms") == 1
    # knee: scale both to [0,1] over the front: (0.15, 2.0) -> (0.5, 0.25) is nearest the origin
    assert select(POINTS, MODES, NAMES, "knee") == 2
    with pytest.raises(ValueError):
        select(POINTS, MODES, NAMES, "best")


@pytest.mark.slow
def test_two_objective_search_logs_pareto_front(tmp_path: Path) -> None:
    raw = yaml.safe_load((SPACES_DIR / "zdc_swiglu_tiny.yaml").read_text())
    raw.pop("objective")
    raw.update(name="tiny_pareto", select="knee", scheduler={"type": "none"},
               objectives=[{"metric": "mean_separation", "mode": "min"}, {"metric": "gen_time_ms", "mode": "min"}])
    raw["params"]["hidden_width"] = {"type": "categorical", "choices": [8, 64]}
    raw["fixed"].pop("hidden_width")
    space = tmp_path / "tiny_pareto.yaml"
    space.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    proc = run_cli(["calotune.search", str(space), "--home", str(home), "--trials", "4", "--max-epochs", "1"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Pareto front (mean_separation vs gen_time_ms)" in proc.stderr
    client = mlflow_client(home)
    exp = client.get_experiment_by_name("tiny_pareto")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags["calotune.kind"] == "search")
    local = client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path))
    front = json.loads(Path(local).read_text())
    assert front["objectives"] == ["mean_separation", "gen_time_ms"] and front["select"] == "knee"
    runs = {r.data.tags["calotune.trial_id"]: r for r in trial_runs(home, "tiny_pareto")}
    points = {t: (r.data.metrics["mean_separation"], r.data.metrics["gen_time_ms"]) for t, r in runs.items()}
    ids = list(points)
    expected = {ids[i] for i in pareto_front([points[t] for t in ids], MODES)}
    assert {row["trial"] for row in front["front"]} == expected
    assert {t for t, r in runs.items() if r.data.tags["calotune.pareto"] == "true"} == expected
    chosen = [row["trial"] for row in front["front"] if row["chosen"]]
    assert len(chosen) == 1
    candidate = client.get_model_version_by_alias(registered_name(str(space)), "candidate")
    assert candidate.run_id == runs[chosen[0]].info.run_id
