"""bf16 autocast and torch.compile as trainer settings (fixed or searched), and GPU sharing.

bf16 is checked numerically against fp32 on CPU (torch's CPU autocast supports it); the
GPU-only parts (pinned prefetch, fractional GPUs on one device) are checked where they can
be without a GPU: the resource request Ray gets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.spec import TrainerConfig, load_spec
from calotune.tuning.worker import TrialContext, _train_epoch, compile_submodules, train, trainer_config

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


def _ctx(**fixed: Any) -> TrialContext:
    return TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                        objectives=(("mean_separation", "min"),), max_epochs=1,
                        fixed={"hidden_width": 16, "batch_size": 64, **fixed}, validation_batch=64)


def test_bf16_autocast_matches_fp32_within_bf16_precision() -> None:
    """One epoch from the same start: bf16's 8-bit mantissa moves the losses by well
    under a percent on this model, and the weights stay fp32 (autocast casts per op)."""
    from calotune.models.base import TrainContext
    from calotune.models.registry import build_model
    from calotune.tuning.worker import StepFn

    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(400, seed=2), seed=0)
    sums = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model("zdc_swiglu", {"hidden_width": 16}, detector)
        model.load_preparation(model.prepare(data.train))
        ctx = TrainContext(step=StepFn(1, 10.0), all_reduce_mean=lambda t: t, rank=0, world_size=1,
                           device=torch.device("cpu"))
        order = torch.arange(len(data.train)).numpy()
        sums[precision], n, _ = _train_epoch(model, model.make_optimizers(), ctx, data.train, order, 64, 0,
                                             precision=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert n > 1 and sums["fp32"].keys() == sums["bf16"].keys()
    for key, value in sums["fp32"].items():
        assert sums["bf16"][key] == pytest.approx(value, rel=0.05, abs=1e-3), key
    assert sums["bf16"] != sums["fp32"]  # autocast really ran in bf16


def test_trainer_settings_merge_fixed_and_sampled_and_are_checked(tmp_path: Path) -> None:
    ctx = _ctx(precision="bf16")
    assert trainer_config(ctx, {"compile": True}) == TrainerConfig(batch_size=64, precision="bf16", compile=True)
    assert trainer_config(ctx, {"precision": "fp32"}).precision == "fp32"  # sampled beats fixed
    space = tmp_path / "s.yaml"
    base = ("family: zdc_swiglu\ndetector: zdc\ngeometry: {ecal_nx: 4, ecal_ny: 4, hcal_nx: 4, hcal_ny: 4, "
            "hcal_nz: 6}\nparams:\n  precision: {type: categorical, choices: [fp32, bf16]}\n"
            "  compile: {type: categorical, choices: [false, true]}\n")
    space.write_text(base)
    spec = load_spec(str(space))
    assert {p.name for p in spec.params} == {"precision", "compile"}
    space.write_text(base.replace("[fp32, bf16]", "[fp32, fp16]"))
    with pytest.raises(UserError, match="precision"):
        load_spec(str(space))
    space.write_text(base + "data: {validation_events: 10}\n")
    with pytest.raises(UserError, match="validation_events"):
        load_spec(str(space))


def test_compile_keeps_checkpoint_keys() -> None:
    """In-place compilation: the state_dict, hence checkpoints and saved models, do not change."""
    from calotune.models.registry import build_model

    model = build_model("zdc_swiglu", {"hidden_width": 8}, get_detector("zdc", **GEOMETRY))
    keys = list(model.state_dict())
    compile_submodules(model)
    assert list(model.state_dict()) == keys


def test_a_compiled_bf16_trial_trains_and_scores() -> None:
    """The whole trainer with compile and bf16 on (CPU inductor: a compile of seconds)."""
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(300, seed=2), seed=0)
    results: list[dict[str, Any]] = []
    train(_ctx(), {"precision": "bf16", "compile": True}, data, lambda m, c: results.append(m),
          device=torch.device("cpu"))
    assert len(results) == 1 and results[0]["mean_separation"] >= 0


def test_fractional_gpus_reach_ray_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpus_per_trial 0.25 is asked of Ray as 0.25 GPU per trial, so four trials share one
    device; Ray then sets CUDA_VISIBLE_DEVICES to it, and the trial's device is its cuda:0."""
    from calotune.spec import ResourceSpec
    from calotune.tuning import runner

    captured: dict[str, Any] = {}

    def with_resources(trainable: Any, resources: dict[str, Any]) -> Any:
        captured.update(resources)
        raise StopIteration  # enough: the request is what this test checks

    spec = load_spec("zdc_swiglu_tiny")
    resources = dataclasses.replace(ResourceSpec(), cpus_per_trial=1, gpus_per_trial=0.25)
    monkeypatch.setattr(runner.tune, "with_resources", with_resources)
    with pytest.raises(StopIteration):
        runner.make_tuner(spec=spec, ctx=_ctx(), data_ref=None, baseline={}, storage_path="/nonexistent",
                          run_name="x", seed=0, trials=1, callback=None, max_concurrent=4,
                          resources=resources, restore=False)
    assert captured == {"cpu": 1, "gpu": 0.25}
    assert str(runner._device()) in {"cpu", "cuda"}  # "cuda" is the first visible GPU: the assigned one
