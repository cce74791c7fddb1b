"""Registry safety: promotion only to better models, serialised promotions, rollback, no pickles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from calotune.artifacts import WEIGHTS, load_model, save_model
from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.models.registry import build_model
from calotune.promote import main as promote_main
from calotune.tracking.mlflow_tracker import Tracker
from calotune.tracking.registry import file_hash
from calotune.tuning.worker import BEST_DIR, TrialContext, train
from tests.helpers import mlflow_client

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}
PARAMS = {"hidden_width": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained model ("good"), an untrained one ("bad") and the data file they share."""
    root = tmp_path_factory.mktemp("models")
    detector = get_detector("zdc", **GEOMETRY)
    showers = detector.synthesize(700, seed=5)
    data = root / "data.h5"
    detector.write(data, showers)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=detector.geometry_dict(),
                       objectives=(("mean_separation", "min"),), max_epochs=6, fixed=PARAMS)
    good = root / "good"

    def keep_best(_metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            shutil.rmtree(good, ignore_errors=True)
            shutil.copytree(checkpoint / BEST_DIR, good)

    torch.manual_seed(0)
    train(ctx, {"batch_size": 64}, split(showers, seed=0), keep_best, device=torch.device("cpu"))
    bad = save_model(root / "bad", build_model("zdc_swiglu", PARAMS, detector), family="zdc_swiglu",
                     detector=detector, params=PARAMS)
    return {"good": good, "bad": bad, "data": data}


def _register(home: Path, models: dict[str, Path], *which: str) -> dict[str, str]:
    """Register the named models as new versions of 'zdc' (alias candidate on the last)."""
    home.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "registry-test", home / "artifacts")
    tracker.create_search(f"search-{uuid.uuid4().hex[:8]}", {}, {})
    versions = {}
    for name in which:
        run = tracker.trial_run(f"{name}-{len(versions)}", {})
        tracker.log_artifacts(run, models[name], "model")
        versions[name] = tracker.register(run, "model", "zdc", "candidate", {
            "objective": "mean_separation", "mode": "min", "data_path": str(models["data"]),
            "data_hash": file_hash(models["data"]), "split_seed": 0, "search": "test"})
    return versions


def _aliases(home: Path) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow_client(home).get_registered_model("zdc").aliases.items()}


def test_first_promotion_then_only_better_then_force_and_rollback(tmp_path: Path, models) -> None:
    home = tmp_path / "home"
    v = _register(home, models, "good")
    assert promote_main(["zdc", "--home", str(home)]) == 0
    assert _aliases(home)["production"] == v["good"]
    record = mlflow_client(home).get_model_version("zdc", v["good"]).tags
    assert record["promotion"] == "first" and record["replaced_version"] == "none"
    assert float(record["candidate_score"]) >= 0 and record["promoted_by"]

    v.update(_register(home, models, "bad"))
    assert promote_main(["zdc", "--home", str(home)]) == 0
    assert _aliases(home)["production"] == v["good"], "a worse candidate must not be promoted"
    assert "promotion" not in mlflow_client(home).get_model_version("zdc", v["bad"]).tags

    assert promote_main(["zdc", "--home", str(home), "--force"]) == 0
    assert _aliases(home)["production"] == v["bad"]
    forced = mlflow_client(home).get_model_version("zdc", v["bad"]).tags
    assert forced["promotion"] == "forced"
    assert float(forced["candidate_score"]) > float(forced["production_score"])

    assert promote_main(["zdc", "--home", str(home), "--to-version", v["good"]]) == 0
    assert _aliases(home)["production"] == v["good"]
    assert mlflow_client(home).get_model_version("zdc", v["good"]).tags["promotion"] == "rollback"


def test_two_promotions_at_once_keep_the_better_model(tmp_path: Path, models) -> None:
    home = tmp_path / "home"
    v = _register(home, models, "good", "bad")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "calotune.promote", "zdc", "--home", str(home),
                               "--candidate-version", v[name]], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("bad", "good")]
    outs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert _aliases(home)["production"] == v["good"], outs
    names = {m.name for m in mlflow_client(home).search_registered_models()}
    assert names == {"zdc"}, "the promotion lock must be released"


def test_unknown_model_or_alias_exit_2(tmp_path: Path, models, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _register(home, models, "good")
    assert promote_main(["atlas", "--home", str(home)]) == 2
    assert "no registered model 'atlas'" in capsys.readouterr().err
    assert promote_main(["zdc", "--home", str(home), "--to-version", "99"]) == 2
    assert "has no version 99" in capsys.readouterr().err


def test_pickle_payload_in_model_is_refused(tmp_path: Path, models) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tampered = tmp_path / "tampered"
    shutil.copytree(models["good"], tampered)
    state = torch.load(tampered / WEIGHTS, weights_only=True)
    state["payload"] = Payload()
    torch.save(state, tampered / WEIGHTS)
    with pytest.raises(UserError, match="refused to load"):
        load_model(tampered)
    assert not marker.exists(), "loading a registered model must not execute pickled code"

    # Through the registry and the generate CLI as well.
    home = tmp_path / "home"
    v = _register(home, {**models, "tampered": tampered}, "tampered")
    proc = subprocess.run([sys.executable, "-m", "calotune.generate", f"models:/zdc/{v['tampered']}",
                           "--events", "5", "--out", str(tmp_path / "gen.h5"), "--home", str(home)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "gen.h5").exists()
