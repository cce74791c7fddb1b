"""Searches on a registered model (``base_model``), a family's own pruning, health metrics.

The worker's side is tested in-process on zdc_swiglu (monkeypatched hooks); the whole
path (registry -> object store -> trials -> registered version with its lineage) by a
real fine-tuning search on the model a real tiny search registered.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.models import zdc_swiglu
from calotune.models.base import TrialPruned
from calotune.models.registry import build_model
from calotune.spec import parse_spec
from calotune.tuning.runner import result_state
from calotune.tuning.worker import BEST_DIR, PRUNED_KEY, TrialContext, train
from tests.helpers import mlflow_client, registered_name, run_cli

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}
FIXED = {"hidden_width": 16, "batch_size": 64}


def _ctx(max_epochs: int, **kw: Any) -> TrialContext:
    return TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                        objectives=(("mean_separation", "min"),), max_epochs=max_epochs,
                        fixed=FIXED, validation_batch=16, **kw)


def _data():
    return split(get_detector("zdc", **GEOMETRY).synthesize(200, seed=2), seed=0)


def _parent(data) -> Any:
    torch.manual_seed(5)
    model = build_model("zdc_swiglu", {"hidden_width": 16}, get_detector("zdc", **GEOMETRY))
    model.load_preparation(model.prepare(data.train))
    return model


def _collect(results: list, keep: Path | None = None):
    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        results.append(dict(metrics))
        if keep is not None and checkpoint is not None and (checkpoint / BEST_DIR).is_dir():
            import shutil

            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(checkpoint / BEST_DIR, keep)
    return report


# ---- the worker -------------------------------------------------------------------------
def test_sampling_only_trial_scores_the_parents_weights_once(tmp_path: Path) -> None:
    data = _data()
    parent = _parent(data)
    results: list[dict[str, Any]] = []
    train(_ctx(1, train_phases=(), parent="zdc/1"), {}, data, _collect(results, tmp_path / "best"),
          device=torch.device("cpu"), parent=parent)
    (metrics,) = results
    assert "mean_separation" in metrics and not any(k.startswith("train_") for k in metrics)
    saved = torch.load(tmp_path / "best" / "weights.pt", weights_only=True)
    for name, tensor in parent.state_dict().items():  # nothing trained: the parent's weights
        assert torch.equal(saved[name], tensor), name


def test_retrained_phase_starts_from_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data()
    parent = _parent(data)
    seen: list[tuple[str, ...]] = []
    inherit = zdc_swiglu.ZDCSwiGLU.inherit

    def spy(self, other, phases):
        seen.append(phases)
        inherit(self, other, phases)
        for name, tensor in other.state_dict().items():
            assert torch.equal(self.state_dict()[name], tensor), name

    monkeypatch.setattr(zdc_swiglu.ZDCSwiGLU, "inherit", spy)
    prepared = dict(parent.preparation())
    monkeypatch.setattr(zdc_swiglu.ZDCSwiGLU, "prepare",
                        lambda self, train: pytest.fail("a retrained model keeps the parent's preparation"))
    results: list[dict[str, Any]] = []
    train(_ctx(1, train_phases=("train",), parent="zdc/1"), {"lr_generator": 1e-4}, data,
          _collect(results), device=torch.device("cpu"), parent=parent)
    assert seen == [("train",)]
    assert any(k.startswith("train_") for k in results[0]) and "mean_separation" in results[0]
    assert prepared.keys() == parent.preparation().keys()


def test_family_pruning_ends_the_trial_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def epoch_metrics(self, ctx):
        calls.append(ctx.epoch)
        if ctx.epoch == 1:
            raise TrialPruned("codebook collapsed: 1 of 64 codes used")
        return {"usage": 0.5}

    monkeypatch.setattr(zdc_swiglu.ZDCSwiGLU, "epoch_metrics", epoch_metrics)
    results: list[dict[str, Any]] = []
    train(_ctx(3), {}, _data(), _collect(results), device=torch.device("cpu"))
    first, last = results
    assert first["health_usage"] == 0.5 and "mean_separation" in first
    assert last == {PRUNED_KEY: "codebook collapsed: 1 of 64 codes used"}
    assert calls == [0, 1]  # nothing after the pruning
    assert result_state({**last, "training_iteration": 2}, 3) == ("pruned", last[PRUNED_KEY])
    assert result_state({"training_iteration": 3, "mean_separation": 1.0}, 3) == ("complete", None)


# ---- the space --------------------------------------------------------------------------
BASE = {"name": "ft", "family": "zdc_swiglu", "detector": "zdc", "geometry": GEOMETRY,
        "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 1e-3}}}


@pytest.mark.parametrize("extra, key, words", [
    ({"train_phases": ["train"]}, "train_phases", "no base_model"),
    ({"base_model": "zdc@production"}, "base_model", "models:/NAME@ALIAS"),
    ({"base_model": "models:/zdc@candidate", "train_phases": ["prior"]}, "train_phases", "'prior'"),
    ({"base_model": "models:/zdc@candidate", "train_phases": "train"}, "train_phases", "list"),
    ({"base_model": "models:/zdc@candidate"}, "base_model", "SAMPLING_PARAMS"),
    ({"base_model": "models:/zdc/3", "train_phases": ["train"], "fixed": {"hidden_width": 8}},
     "fixed.hidden_width", "comes from the registered model"),
])
def test_search_on_a_registered_model_refuses_with_the_rule(extra: dict, key: str, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_spec({**BASE, **extra}, "ft.yaml")
    message = str(info.value)
    assert message.startswith(f"ft.yaml: {key}:") and words in message, message


def test_sampling_only_space_takes_only_sampling_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zdc_swiglu, "SAMPLING_PARAMS", ("mask_temperature",), raising=False)
    ok = parse_spec({**BASE, "base_model": "models:/zdc@candidate",
                     "params": {"mask_temperature": {"type": "float", "low": 0.2, "high": 1.0}}}, "s.yaml")
    assert ok.train_phases == () and ok.max_epochs == 1 and ok.base_model == "models:/zdc@candidate"
    with pytest.raises(UserError, match=r"params\.lr_generator: comes from the registered model"):
        parse_spec({**BASE, "base_model": "models:/zdc@candidate"}, "s.yaml")
    with pytest.raises(UserError, match=r"budget\.max_epochs: a sampling-only search"):
        parse_spec({**BASE, "base_model": "models:/zdc@candidate", "budget": {"max_epochs": 3},
                    "params": {"mask_temperature": {"type": "float", "low": 0.2, "high": 1.0}}}, "s.yaml")


# ---- for real: a fine-tuning search on a registered model ------------------------------
@pytest.mark.slow
def test_fine_tuning_search_on_a_registered_model_records_its_lineage(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run_cli(["calotune.search", "zdc_swiglu_tiny", "--trials", "2", "--max-epochs", "1",
                     "--home", str(home)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    name = registered_name("zdc_swiglu_tiny")
    client = mlflow_client(home)
    parent_version = client.get_model_version_by_alias(name, "candidate").version
    space = tmp_path / "zdc_finetune.yaml"
    space.write_text(textwrap.dedent(f"""\
        name: zdc_finetune
        family: zdc_swiglu
        detector: zdc
        geometry: {{ecal_nx: 4, ecal_ny: 4, hcal_nx: 4, hcal_ny: 4, hcal_nz: 6}}
        data: {{events: 400, seed: 1}}
        base_model: models:/{name}@candidate
        train_phases: [train]
        budget: {{trials: 2, max_epochs: 1}}
        scheduler: {{type: none}}
        resources: {{cpus_per_trial: 1}}
        params:
          lr_generator: {{type: float, low: 1.0e-4, high: 5.0e-3, log: true}}
        fixed: {{batch_size: 64}}
        """))
    # another split of the parent's own file would score its training events as held-out
    leak = run_cli(["calotune.search", str(space), "--home", str(home), "--seed", "4"], cwd=tmp_path)
    assert leak.returncode == 2, leak.stderr[-3000:]
    assert "--seed 0" in leak.stderr and "training events" in leak.stderr

    second = run_cli(["calotune.search", str(space), "--home", str(home)], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    label = f"{name}/{parent_version}"
    exp = client.get_experiment_by_name("zdc_finetune")
    runs = client.search_runs([exp.experiment_id], max_results=50)
    search = [r for r in runs if r.data.tags.get("calotune.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
    assert len(search) == 1 and search[0].data.tags["calotune.parent_model"] == label
    assert search[0].data.params["parent_model"] == label
    assert len(trials) == 2 and all(t.data.tags["calotune.parent_model"] == label for t in trials)
    assert all(t.data.params["lr_generator"] for t in trials)
    for t in trials:  # physics and progress, not Ray's bookkeeping
        assert not {"pid", "timestamp", "time_since_restore", "iterations_since_restore"} & set(t.data.metrics)
        assert "training_iteration" in t.data.metrics and "train_loss_generator" in t.data.metrics
    child = client.get_model_version_by_alias(name, "candidate")
    assert int(child.version) > int(parent_version)
    assert child.tags["calotune.parent_model"] == label and child.tags["train_phases"] == "train"
    assert child.tags["improves_on_parent"] in {"true", "false"}
    # the baseline trial is the parent itself, fine-tuned with its own settings
    assert math.isfinite(float(child.tags["score"]))
