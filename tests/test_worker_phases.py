"""The worker's side of the family contract: unscoreable phases and reduced-cost validation.

zdc_swiglu has one phase and no cost knob, so these tests give it others (monkeypatched
methods) to check that the worker never scores an unscoreable epoch and names reduced-cost
scores, and that the scheduler and searcher pass over a result without the objective.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.models.base import Phase
from calotune.models.zdc_swiglu import ZDCSwiGLU
from calotune.tuning.runner import BaselineKeepingASHA, FailAwareOptunaSearch
from calotune.tuning.worker import BEST_DIR, FAST_SUFFIX, TRAIN_STATE, TrialContext, train

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


def _run(max_epochs: int, tmp_path: Path) -> list[tuple[dict[str, Any], set[str]]]:
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(200, seed=2), seed=0)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                       objectives=(("mean_separation", "min"),), max_epochs=max_epochs,
                       fixed={"hidden_width": 16, "batch_size": 64}, validation_batch=16)
    results: list[tuple[dict[str, Any], set[str]]] = []

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        assert checkpoint is not None  # every epoch is resumable, scored or not
        files = {p.name for p in checkpoint.iterdir()}
        if BEST_DIR in files:
            files |= {f"best:{(checkpoint / BEST_DIR / 'model.json').is_file()}"}
        assert TRAIN_STATE in files
        results.append((dict(metrics), files))

    train(ctx, {}, data, report, device=torch.device("cpu"))
    return results


def test_unscoreable_epochs_report_training_losses_only(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(ZDCSwiGLU, "phases", lambda self: (Phase("warmup", 1.0, scoreable=False),
                                                           Phase("train", 2.0)))
    results = _run(3, tmp_path)
    (first, files1), (second, files2), (third, _) = results
    assert set(first) == {k for k in first if k.startswith("train_")} | {"epoch_time_s"}
    assert BEST_DIR not in files1  # no best model chosen on an unscoreable epoch
    assert "mean_separation" in second and "mean_separation_epoch" in second
    assert "best:True" in files2 and "mean_separation" in third


def test_reduced_cost_scores_are_suffixed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    full = ZDCSwiGLU.sample

    def sample(self, conditions, generator=None, **kwargs):
        calls.append(kwargs)
        return full(self, conditions, generator)

    monkeypatch.setattr(ZDCSwiGLU, "sample", sample)
    monkeypatch.setattr(ZDCSwiGLU, "validation_sample_kwargs", lambda self: {"steps": 3})
    (metrics, _), = _run(1, tmp_path)
    assert calls and all(c == {"steps": 3} for c in calls)
    assert f"mean_separation{FAST_SUFFIX}" in metrics and f"gen_time_ms{FAST_SUFFIX}" in metrics
    assert "gen_time_ms" not in metrics and metrics["validation_fast"] == 1.0
    # the objective Tune ranks on keeps its plain name
    assert metrics["mean_separation"] == metrics[f"mean_separation{FAST_SUFFIX}"]


def test_asha_and_optuna_pass_over_results_without_the_objective() -> None:
    asha = BaselineKeepingASHA({"lr": 1.0}, time_attr="training_iteration", metric="mean_separation",
                               mode="min", max_t=4, grace_period=1, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"lr": float(i + 2)}) for i in range(3)]
    for t in trials:
        asha.on_trial_add(None, t)
    # unscoreable epochs: no metric, so no rung is filled and nobody is stopped
    for t in trials:
        assert asha.on_trial_result(None, t, {"training_iteration": 1, "train_loss": 9.0}) == "CONTINUE"
    assert all(not rung[1] for b in asha._brackets for rung in b._rungs)
    search = FailAwareOptunaSearch(metric="mean_separation", mode="min",
                                   space={"lr": __import__("ray").tune.uniform(0, 1)})
    search.on_trial_result("nobody", {"training_iteration": 1, "train_loss": 1.0})  # no KeyError


def test_step_fn_stops_a_nan_loss_and_sums_tensor_losses_once() -> None:
    from calotune.tuning.worker import NonFiniteLossError, StepFn, _to_floats

    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.1)
    step = StepFn(world_size=1, grad_clip=0.0)
    step((weight * 2).sum(), opt)
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))
    with pytest.raises(NonFiniteLossError):
        step((weight * float("nan")).sum(), opt)  # on CPU the flag is read at once
    step.check()  # nothing pending after the failed check: no second error
    sums = {"a": torch.tensor(1.5) + torch.tensor(2.0), "b": 3.0}
    assert _to_floats(sums) == {"a": 3.5, "b": 3.0}
