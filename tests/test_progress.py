"""The search's progress view: its state logic on fake Tune trials, in-process, and the
terminal / batch-log / quiet outputs (no Ray started)."""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest

from calotune.errors import UserError
from calotune.tuning.runner import PROGRESS_ENV, ProgressCallback, ProgressState, progress_mode
from calotune.tuning.worker import FAILED_KEY

BASELINE = {"lr": 0.001}


@dataclass
class FakeTrial:
    """What the progress view reads of a Ray Tune trial."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None

    def get_error(self) -> str:
        return "RuntimeError: boom"


def _result(trial: FakeTrial, epoch: int, value: float | None, seconds: float = 10.0) -> dict[str, Any]:
    result = {"training_iteration": epoch, "time_this_iter_s": seconds}
    if value is not None:
        result["mean_separation"] = value
    trial.last_result = result
    return result


def _callback(trials: int = 4, max_epochs: int = 2, **kwargs: Any) -> ProgressCallback:
    return ProgressCallback("mean_separation", "min", trials, max_epochs, baseline=BASELINE, **kwargs)


def test_counts_best_against_baseline_and_time_left() -> None:
    state = ProgressState("mean_separation", "min", trials=4, max_epochs=2, baseline=BASELINE, concurrency=2)
    base, other = FakeTrial("base", dict(BASELINE)), FakeTrial("b", {"lr": 0.01})
    assert state.seconds_left() is None, "no estimate before the first timed epoch"
    state.result("base", base.config, _result(base, 1, 0.60))
    state.result("b", other.config, _result(other, 1, 0.50))
    assert state.counts() == {"running": 2, "complete": 0, "pruned": 0, "failed": 0}
    assert (state.best, state.best_trial, state.baseline_value) == (0.50, "b", 0.60)
    # owed epochs: 1 + 1 (running) + 2 x 2 (two trials not started) = 6, 10 s each, 2 at a time
    assert state.seconds_left() == pytest.approx(30.0)
    state.end("b", "pruned")
    state.result("base", base.config, _result(base, 2, 0.55))
    state.end("base", "complete")
    assert state.counts() == {"running": 0, "complete": 1, "pruned": 1, "failed": 0}
    assert state.finished == 2 and state.baseline_value == 0.55
    text = state.summary()
    assert "complete 1" in text and "pruned 1" in text and "failed 0" in text
    assert "best mean_separation 0.5000 (baseline 0.5500)" in text and "~20 s left" in text


def test_max_mode_and_unscored_or_failed_results_never_become_best() -> None:
    state = ProgressState("auc", "max", trials=2, max_epochs=3)
    assert state.result("a", {}, {"training_iteration": 1}) is None  # an unscoreable phase's epoch
    assert state.result("a", {}, {"training_iteration": 2, "auc": 0.7}) == 0.7
    assert state.result("a", {}, {"training_iteration": 3, "auc": 0.1, FAILED_KEY: "nan loss"}) is None
    assert state.result("a", {}, {"training_iteration": 3, "auc": float("nan")}) is None
    assert state.best == 0.7


def test_a_resumed_search_counts_the_trials_already_finished(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune hands the restored trials to its callbacks in the trial list, not as events."""
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    done = FakeTrial("done", {"lr": 0.01}, "TERMINATED", {"training_iteration": 2, "mean_separation": 0.4})
    stopped = FakeTrial("stopped", {"lr": 0.1}, "TERMINATED", {"training_iteration": 1, "mean_separation": 0.9})
    broken = FakeTrial("broken", {"lr": 0.2}, "ERROR", {"training_iteration": 1})
    resumed = FakeTrial("resumed", dict(BASELINE), "RUNNING", {"training_iteration": 1, "mean_separation": 0.6})
    pending = FakeTrial("new", {"lr": 0.3}, "PENDING")
    trials = [done, stopped, broken, resumed, pending]
    callback = pickle.loads(pickle.dumps(_callback(trials=6)))  # as Ray Tune restores it
    callback.on_step_begin(0, trials)
    assert callback.state.counts() == {"running": 1, "complete": 1, "pruned": 1, "failed": 1}
    assert callback.state.best == 0.4 and callback.state.baseline_value == 0.6
    with caplog.at_level(logging.INFO, logger="calotune.tuning.runner"):
        callback.on_trial_result(1, trials, resumed, _result(resumed, 2, 0.5))
        resumed.status = "TERMINATED"
        callback.on_trial_complete(1, trials, resumed)
    assert "[3/6 done] resumed epoch 2/2 mean_separation=0.5000" in caplog.text
    assert "[4/6 done] resumed complete" in caplog.text, "the count must go on from the restored trials"


def test_without_a_terminal_it_writes_log_lines_and_no_bar(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    stream = io.StringIO()  # not a TTY, like a Slurm log
    assert progress_mode(False, stream) == "lines"
    callback = _callback(trials=3, stream=stream)
    a, b = FakeTrial("a", dict(BASELINE)), FakeTrial("b", {"lr": 0.5}, status="PENDING")
    with caplog.at_level(logging.INFO, logger="calotune.tuning.runner"):
        callback.on_trial_start(0, [a, b], a)
        callback.on_trial_result(1, [a, b], a, _result(a, 1, 0.7))
        b.status, b.last_result = "RUNNING", {"training_iteration": 1, FAILED_KEY: "loss is nan"}
        callback.on_trial_result(1, [a, b], b, b.last_result)
        b.status = "TERMINATED"
        callback.on_trial_complete(2, [a, b], b)
        callback.on_experiment_end([a, b])
    assert stream.getvalue() == "", "no bar (carriage returns) in a log file"
    assert "[0/3 done] a epoch 1/2 mean_separation=0.7000 · running 1" in caplog.text
    assert "(baseline 0.7000)" in caplog.text
    assert "[1/3 done] b FAILED: loss is nan" in caplog.text
    assert [r.levelname for r in caplog.records if "FAILED" in r.getMessage()] == ["WARNING"]


def test_quiet_mode_keeps_only_finished_trials(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "quiet")
    callback = _callback(trials=2, max_epochs=1)
    a = FakeTrial("a", dict(BASELINE))
    with caplog.at_level(logging.INFO, logger="calotune.tuning.runner"):
        callback.on_trial_result(1, [a], a, _result(a, 1, 0.3))
        a.status = "TERMINATED"
        callback.on_trial_complete(1, [a], a)
    assert "epoch" not in caplog.text
    assert "[1/2 done] a complete" in caplog.text


def test_on_a_terminal_it_draws_one_bar_with_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "bar")  # what a TTY gets; forced, so the test needs no terminal
    stream = io.StringIO()
    callback = _callback(trials=2, max_epochs=1, stream=stream)
    a, b = FakeTrial("a", dict(BASELINE)), FakeTrial("b", {"lr": 0.2})
    callback.on_trial_start(0, [a, b], a)
    callback.on_trial_result(1, [a, b], a, _result(a, 1, 0.3))
    a.status = "TERMINATED"
    callback.on_trial_complete(1, [a, b], a)
    callback.on_trial_result(2, [a, b], b, _result(b, 1, 0.2))
    b.status = "TERMINATED"
    callback.on_trial_complete(2, [a, b], b)
    callback.on_experiment_end([a, b])
    out = stream.getvalue()
    assert "[1/2 done] a complete" in out, "finished trials are written above the bar"
    final = out.rsplit("\r", 1)[-1]
    assert "2/2" in final and "complete 2" in final and "best mean_separation 0.2000 (baseline 0.3000)" in final
    assert callback._bar is None, "the bar is closed at the end of the experiment"


def test_a_mistyped_progress_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from calotune.tuning.orchestrate import _check_progress_env

    monkeypatch.setenv(PROGRESS_ENV, "fancy")
    with pytest.raises(UserError, match=r"CALOTUNE_PROGRESS=.fancy.*bar, lines or quiet"):
        _check_progress_env()
    monkeypatch.setenv(PROGRESS_ENV, "Quiet")
    _check_progress_env()
