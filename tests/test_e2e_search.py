"""End to end, for real: a tiny search (real Ray, real MLflow SQLite), promote, generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")
    proc = _run(["calotune.search", "zdc_swiglu", "--trials", "3", "--max-epochs", "2",
                 "--events", "700", "--seed", "3"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work, proc


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / '.calotune' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_search_logs_nested_runs_and_registers_candidate(searched) -> None:
    work, proc = searched
    assert "held-out test mean_separation" in proc.stderr
    assert "default configuration" in proc.stderr
    client = _client(work)
    exp = client.get_experiment_by_name("zdc_swiglu")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("calotune.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert {t.data.tags["calotune.state"] for t in trials} <= {"complete", "pruned"}
    assert len({t.info.run_name for t in trials}) == 3
    for t in trials:
        assert "lr_generator" in t.data.params
        history = client.get_metric_history(t.info.run_id, "mean_separation")
        assert 1 <= len(history) <= 2
    version = client.get_model_version_by_alias("zdc", "candidate")
    assert version.tags["objective"] == "mean_separation"
    assert float(version.tags["score"]) >= 0
    assert version.tags["data_hash"] == parents[0].data.tags["calotune.data_hash"]
    best_run = client.get_run(version.run_id)
    artifacts = {a.path for a in client.list_artifacts(best_run.info.run_id)}
    assert {"model", "plots"} <= artifacts
    plots = client.list_artifacts(best_run.info.run_id, "plots")
    assert plots, "the best trial must carry distribution plots"


def test_promote_then_generate(searched, tmp_path: Path) -> None:
    work, _ = searched
    first = _run(["calotune.promote", "zdc"], cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    client = _client(work)
    candidate = client.get_model_version_by_alias("zdc", "candidate")
    production = client.get_model_version_by_alias("zdc", "production")
    assert production.version == candidate.version
    assert production.tags["promotion"] == "first"
    assert production.tags["replaced_version"] == "none"

    out = tmp_path / "gen.h5"
    gen = _run(["calotune.generate", "models:/zdc@production", "--events", "50", "--out", str(out)],
               cwd=work)
    assert gen.returncode == 0, gen.stderr[-3000:]
    with h5py.File(out) as f:
        assert f["incident_energies"].shape == (50, 1)
        assert f["hcal"].shape == (50, 3600) and f["ecal"].shape == (50, 400)
        assert (f["hcal"][:] >= 0).all()
        assert f["hcal"][:].sum() > 0

    missing = _run(["calotune.generate", "models:/zdc@staging", "--events", "5", "--out",
                    str(tmp_path / "x.h5")], cwd=work)
    assert missing.returncode == 2
    assert "has no alias 'staging'" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.h5").exists()
