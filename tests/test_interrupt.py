"""Stopping, resuming and doubling searches: the record must stay true.

Real processes and real signals: Ctrl-C reaches the driver's whole process group (as a
terminal sends it), SIGTERM reaches the driver alone (``kill``, a batch system). Each test
waits on an event (a line in the search's log, a process exit), never on a sleep.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from calotune.search import main as search_main
from tests.conftest import stop_group, wait_for
from tests.helpers import mlflow_client, run_cli, trial_runs

SPACE = "zdc_swiglu_tiny"


def _start(tmp: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "calotune.search", SPACE, "--home", str(tmp / "home"), *extra],
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _parents(home: Path) -> list:
    client = mlflow_client(home)
    exp = client.get_experiment_by_name(SPACE)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("calotune.kind") == "search"]


def _interrupt(tmp: Path, sig: int, whole_group: bool) -> tuple[int, str]:
    """Start a 4-trial search, send ``sig`` once the first epoch is reported, wait for exit.

    Every trial that reaches epoch 2 blocks there (``CALOTUNE_FAULT`` kind "hang"), so the
    search is still running trials when the signal arrives, however fast the machine is:
    the outcome does not depend on a race between the signal and the search's end.
    """
    log = tmp / f"search-{sig}.log"
    proc = _start(tmp, log, "--trials", "4", "--max-epochs", "3", "--seed", "1",
                  env={"CALOTUNE_FAULT": '{"kind": "hang", "epoch": 2}'})
    try:
        wait_for(lambda: "epoch 1/3" in log.read_text(), 300, "the first epoch", proc=proc, log=log)
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=300)
    finally:
        stop_group(proc, signal.SIGKILL)
    return code, log.read_text()


def _assert_interrupted_record(home: Path, text: str) -> None:
    [parent] = _parents(home)
    assert parent.info.status == "KILLED", text[-3000:]
    assert parent.data.tags["calotune.state"] == "interrupted"
    runs = trial_runs(home, SPACE)
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.status) for r in runs]
    interrupted = [r for r in runs if r.data.tags["calotune.state"] == "interrupted"]
    assert interrupted, "the trial running at the signal must be recorded as interrupted"
    for r in interrupted:
        assert r.info.status == "KILLED" and r.data.tags["calotune.interrupted"] == "true"
        assert "mean_separation" not in r.data.metrics, "an unfinished trial has no score"
    assert not any(r.data.tags["calotune.state"] == "failed" for r in runs), "an interrupt is no failure"
    assert not mlflow_client(home).search_registered_models(), "an interrupted search registers nothing"
    assert "nothing registered" in text and "--resume" in text


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_then_resume_finishes(tmp_path: Path) -> None:
    code, text = _interrupt(tmp_path, signal.SIGINT, whole_group=True)
    assert code == 130, text[-3000:]
    home = tmp_path / "home"
    _assert_interrupted_record(home, text)
    before = {r.data.tags["calotune.trial_id"] for r in trial_runs(home, SPACE)}

    resumed = run_cli(["calotune.search", SPACE, "--home", str(home), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    [parent] = _parents(home)
    assert parent.info.status == "FINISHED" and parent.data.tags["calotune.state"] == "finished"
    runs = trial_runs(home, SPACE)
    assert before <= {r.data.tags["calotune.trial_id"] for r in runs}, "no run from before may be lost"
    counted = [r for r in runs if r.data.tags.get("calotune.orphaned") != "true"
               and r.data.tags["calotune.state"] != "interrupted"]
    assert len(counted) == 4 and all(r.info.status != "RUNNING" for r in runs)
    # the resumed budget is the recorded one: every completed trial ran 3 epochs
    assert {int(r.data.metrics["training_iteration"]) for r in counted
            if r.data.tags["calotune.state"] == "complete"} == {3}
    models = [m for m in mlflow_client(home).search_registered_models() if "candidate" in m.aliases]
    assert len(models) == 1, "the finished search registers its candidate once"

    # a finished search is not resumed again (it would register the same trial twice)
    again = run_cli(["calotune.search", SPACE, "--home", str(home), "--resume"], cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_cleanly(tmp_path: Path) -> None:
    code, text = _interrupt(tmp_path, signal.SIGTERM, whole_group=False)
    assert code == 130, text[-3000:]
    assert "SIGTERM received" in text
    _assert_interrupted_record(tmp_path / "home", text)


@pytest.mark.slow
def test_two_searches_started_together_stay_apart(tmp_path: Path) -> None:
    """Same space, same --home, same second: two searches, never one merged record."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(tmp_path, log, "--trials", "2", "--max-epochs", "1") for log in logs]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_group(p, signal.SIGKILL)
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    home = tmp_path / "home"
    parents = _parents(home)
    assert len(parents) == 2 and len({p.data.tags["calotune.search"] for p in parents}) == 2
    for parent in parents:
        children = [r for r in trial_runs(home, SPACE)
                    if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(children) == 2, "each search holds exactly its own trials"
        assert parent.info.status == "FINISHED"


# --- refusals that need no Ray: the record of an existing search must stay untouched ----
def _fake_search(home: Path, name: str, *, finished: bool) -> str:
    """A parent run as a search records it, without running one."""
    from calotune.tracking.mlflow_tracker import Tracker
    from calotune.tuning.lifecycle import budget_record, record_latest

    home.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", SPACE, home / "artifacts")
    record = budget_record(space_hash="", trials=4, max_epochs=3, seed=1, data="", data_hash="",
                           resources={"cpus_per_trial": 1, "gpus_per_trial": 0, "workers_per_trial": 1})
    run_id = tracker.create_search(name, record, {})
    tracker.set_tags(run_id, {"calotune.state": "finished" if finished else "interrupted"})
    tracker.end_search("FINISHED" if finished else "KILLED")
    record_latest(home, SPACE, name)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # store creation chatter is not under test
    return run_id


@pytest.mark.parametrize(("flags", "needle"), [
    (["--trials", "5"], "--trials 5: search"),
    (["--max-epochs", "2"], "--max-epochs 2: search"),
    (["--seed", "0"], "--seed 0: search"),
    (["--cpus-per-trial", "2"], "--cpus-per-trial 2.0: search"),
])
def test_resume_refuses_a_different_budget(flags: list[str], needle: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    run_id = _fake_search(home, "zdc_swiglu_tiny-20261202-000000-abcd", finished=False)
    capsys.readouterr()
    assert search_main([SPACE, "--home", str(home), "--resume", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "keeps its budget" in err and len(err.strip().splitlines()) == 1, err
    assert mlflow_client(home).get_run(run_id).info.status == "KILLED", "the record must be untouched"


def test_resume_refuses_a_finished_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    run_id = _fake_search(home, "zdc_swiglu_tiny-20261202-000000-abcd", finished=True)
    assert search_main([SPACE, "--home", str(home), "--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert mlflow_client(home).get_run(run_id).info.status == "FINISHED"


def test_resume_without_ray_tune_state_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    name = "zdc_swiglu_tiny-20261202-000000-abcd"
    run_id = _fake_search(home, name, finished=False)
    assert search_main([SPACE, "--home", str(home), "--resume", name]) == 2
    err = capsys.readouterr().err
    assert "no Ray Tune state" in err and "--storage-path" in err, err
    assert mlflow_client(home).get_run(run_id).info.status == "KILLED", "the record must be untouched"
    assert not (home / "ray_results").exists()


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", ".hidden", ""])
def test_resume_refuses_names_that_are_not_search_names(name: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _fake_search(home, "zdc_swiglu_tiny-20261202-000000-abcd", finished=False)
    assert search_main([SPACE, "--home", str(home), "--resume", name]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_running_search_cannot_be_resumed_twice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The search lock: a second driver of the same search is refused, naming the holder."""
    from calotune.tuning.lifecycle import search_lock

    home = tmp_path / "home"
    name = "zdc_swiglu_tiny-20261202-000000-abcd"
    _fake_search(home, name, finished=False)
    (home / "ray_results" / name).mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from calotune.tuning.lifecycle import search_lock\n"
         f"with search_lock(Path({str(home)!r}), {name!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="is running right now"), search_lock(home, name):
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with search_lock(home, name):  # released by the holder's exit
        pass


_AFTER_SHUTDOWN = """
import os, signal, threading
import ray
from calotune.tuning import lifecycle

ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
with lifecycle.interruptible():
    stopper = threading.Thread(target=lifecycle.shutdown_ray_keeping_handlers)
    stopper.start()
    stopper.join()
    os.kill(os.getpid(), signal.SIGTERM)
    assert lifecycle.STOP.wait(60), "the handler never ran"
print("handled", lifecycle.received_signal())
"""


def test_a_signal_after_ray_shutdown_still_reaches_the_handler(tmp_path: Path) -> None:
    """Ray's shutdown resets SIGTERM to the default disposition in C. The search shuts Ray
    down on a thread while it scores and registers, so without the saved handlers a
    ``kill`` then would end the driver with -15 and leave its record RUNNING."""
    done = subprocess.run([sys.executable, "-c", _AFTER_SHUTDOWN], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "handled SIGTERM" in done.stdout, (done.returncode, done.stderr[-2000:])
