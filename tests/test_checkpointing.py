"""Sparse checkpoints: written where the scheduler acts, at the end, and on a timer; the
epochs re-run after a resume from an older checkpoint are recorded once."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.tracking.mlflow_tracker import Tracker, default_tracking_uri
from calotune.tuning.checkpointing import CheckpointPolicy, decision_epochs
from calotune.tuning.runner import MlflowTrialCallback
from calotune.tuning.worker import BEST_DIR, TRAIN_STATE, TrialContext, train

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


def test_decision_epochs_follow_the_scheduler() -> None:
    assert decision_epochs("asha", 9, grace_period=1, reduction_factor=3) == (1, 3, 9)
    assert decision_epochs("moasha", 6, grace_period=3, reduction_factor=2) == (3, 6)
    assert decision_epochs("none", 5) == (5,)
    assert decision_epochs("pbt", 7, perturbation_interval=2) == (2, 4, 6, 7)
    # the median rule may stop after any epoch, HyperBand pauses between brackets
    assert decision_epochs("median", 5, grace_period=2) is None
    assert decision_epochs("hyperband", 5) is None


def test_policy_checkpoints_on_decision_epochs_and_on_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("calotune.tuning.checkpointing.time.monotonic", lambda: clock[0])
    policy = CheckpointPolicy((3, 6), every_s=60.0)
    policy.start()
    due = []
    for epoch in range(1, 7):
        clock[0] += 25.0  # 25 s per epoch: the timer fires every third epoch at the latest
        due.append(policy.due(epoch))
    assert due == [False, False, True, False, False, True]
    clock[0] = 0.0
    slow = CheckpointPolicy((6,), every_s=60.0)
    slow.start()
    fired = []
    for epoch in range(1, 6):
        clock[0] += 40.0
        fired.append(slow.due(epoch))
    assert fired == [False, True, False, True, False]  # 80 s and 80 s after the last one
    assert CheckpointPolicy(None).due(1) and CheckpointPolicy((4,), every_s=0).due(1)


def _ctx(**kw: Any) -> TrialContext:
    return TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                        objectives=(("mean_separation", "min"),), max_epochs=4,
                        fixed={"hidden_width": 16, "batch_size": 64}, validation_batch=16, **kw)


def test_worker_writes_checkpoints_only_where_due_and_resumes_identically(tmp_path: Path) -> None:
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(200, seed=2), seed=0)
    reports: list[tuple[dict[str, Any], Path | None]] = []

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        kept = None
        if checkpoint is not None:
            assert (checkpoint / TRAIN_STATE).is_file() and (checkpoint / BEST_DIR).is_dir()
            kept = tmp_path / f"ckpt-{len(reports) + 1}"
            shutil.copytree(checkpoint, kept)
        reports.append((dict(metrics), kept))

    train(_ctx(checkpoint_epochs=(2, 4), checkpoint_every_s=1e9), {}, data, report, device=torch.device("cpu"))
    assert [c is not None for _, c in reports] == [False, True, False, True]

    # resumed from the epoch-2 checkpoint, epochs 3 and 4 give the same numbers again
    again: list[dict[str, Any]] = []
    train(_ctx(checkpoint_epochs=(2, 4), checkpoint_every_s=1e9), {}, data,
          lambda m, _c: again.append(dict(m)), device=torch.device("cpu"), resume_dir=reports[1][1])
    assert len(again) == 2
    for ours, theirs in zip(again, [m for m, _ in reports[2:]], strict=True):
        assert ours["mean_separation_epoch"] == pytest.approx(theirs["mean_separation_epoch"], rel=1e-6)
        assert ours["train_events_total"] == theirs["train_events_total"]


def test_epochs_reported_again_after_a_restart_are_recorded_once(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    Tracker(uri, "exp", tmp_path / "artifacts").create_search("s1", {}, {})
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.1})

    def result(step: int, value: float) -> dict[str, Any]:
        return {"training_iteration": step, "epoch_time_s": value, "mean_separation_epoch": value}

    first = MlflowTrialCallback(uri, "exp", "s1", str(tmp_path / "artifacts"), max_epochs=4)
    first.on_trial_start(0, [], trial)
    for step in (1, 2, 3):
        first.on_trial_result(0, [], trial, result(step, step / 10))
    first.flush()
    # The driver restarts (Tune unpickles its callbacks); the trial resumes from its epoch-1
    # checkpoint and reports epochs 2 and 3 again before the new epoch 4.
    second = pickle.loads(pickle.dumps(first))
    second.on_trial_restore(0, [], trial)
    for step, value in ((2, 0.2), (3, 0.3), (4, 0.4)):
        second.on_trial_result(0, [], trial, result(step, value))
    second.flush()
    client = second.tracker.client
    run_id = second.tracker.trial_run("t1", trial.config)
    history = client.get_metric_history(run_id, "mean_separation_epoch")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert client.get_run(run_id).data.tags["calotune.epochs_rerun"] == "2"


def test_records_still_queued_at_a_kill_are_written_by_the_restored_driver(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    Tracker(uri, "exp", tmp_path / "artifacts").create_search("s1", {}, {})
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.1})
    journal = tmp_path / "searches" / "s1.journal.jsonl"
    first = MlflowTrialCallback(uri, "exp", "s1", str(tmp_path / "artifacts"), max_epochs=4, journal=str(journal))
    first._submit = lambda write: None  # the driver dies before its writer thread runs anything
    first.on_trial_start(0, [], trial)
    for step in (1, 2):
        first.on_trial_result(0, [], trial, {"training_iteration": step, "epoch_time_s": 0.5,
                                             "mean_separation_epoch": step / 10})
    del first._submit
    restored = pickle.loads(pickle.dumps(first))  # what Tune unpickles on --resume
    restored.on_trial_restore(0, [], trial)
    restored.on_trial_result(0, [], trial, {"training_iteration": 3, "epoch_time_s": 0.5,
                                            "mean_separation_epoch": 0.3})
    restored.flush()
    run_id = restored.tracker.trial_run("t1", trial.config)
    history = restored.tracker.client.get_metric_history(run_id, "mean_separation_epoch")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
