"""Each search's Optuna study in a relational storage next to the MLflow store, for
optuna-dashboard; the search run's summary and the experiment's UI view."""

from __future__ import annotations

import multiprocessing
import pickle
import sys
from pathlib import Path

import optuna
import pytest

from calotune.errors import UserError
from calotune.tuning import studies
from tests.helpers import mlflow_client, run_cli

SPACE = "zdc_swiglu_tiny"


def test_default_storage_sits_next_to_the_mlflow_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert studies.default_study_storage(tmp_path / "home", f"sqlite:///{store}/mlflow.db") == \
        f"sqlite:///{store}/optuna.db"
    assert studies.default_study_storage(tmp_path / "home", "http://mlflow:5000") == \
        f"sqlite:///{(tmp_path / 'home').resolve()}/optuna.db", "a tracking server: on the driver's --home"


@pytest.mark.parametrize(("uri", "needle"), [
    ("sqlite://", "in-memory"),
    ("sqlite:///relative/optuna.db", "relative"),
    ("sqlite:////no/such/folder/optuna.db", "does not exist"),
    ("redis://localhost/0", "unsupported study storage"),
    ("postgresql+nosuchdriver://u@localhost/optuna", "no driver"),
])
def test_unusable_storage_is_refused_before_anything_is_written(uri: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle) as err:
        studies.check_study_storage(uri)
    assert str(err.value).startswith("--study-storage ")


def test_a_resumed_search_keeps_its_storage(tmp_path: Path) -> None:
    from calotune.tuning.orchestrate import SearchRequest, _study_storage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert _study_storage(SearchRequest(SPACE, resume="latest"), tmp_path, uri) is None
    with pytest.raises(UserError, match="--study-storage: a resumed search keeps"):
        _study_storage(SearchRequest(SPACE, resume="latest", study_storage=f"sqlite:///{tmp_path}/o.db"),
                       tmp_path, uri)
    assert _study_storage(SearchRequest(SPACE), tmp_path, uri) == f"sqlite:///{tmp_path}/optuna.db"


def _space(trial: optuna.Trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(uri: str):
    from calotune.tuning.runner import FailAwareOptunaSearch

    mirror = studies.StudyMirror(uri, "s1", ["minimize"])
    mirror.open()
    return FailAwareOptunaSearch(space=_space, metric="loss", mode="min", study_mirror=mirror,
                                 sampler=optuna.samplers.RandomSampler(seed=0))


def test_a_resume_from_an_older_snapshot_neither_dies_nor_copies_twice(tmp_path: Path) -> None:
    """Ray Tune pickles the searcher into its snapshots; a driver killed after a trial ended
    but before the next snapshot resumes with that trial still running, and ends it again."""
    uri = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher(uri)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"loss": 0.5, "training_iteration": 1})
    searcher.suggest("t2")
    searcher.on_trial_result("t2", {"loss": 0.4, "training_iteration": 1})
    snapshot = pickle.dumps(searcher)  # Tune's last snapshot: t2 running
    searcher.on_trial_complete("t2", {"loss": 0.3, "training_iteration": 2})  # then the kill

    resumed = pickle.loads(snapshot)
    resumed.on_trial_result("t2", {"loss": 0.35, "training_iteration": 2})  # continued from its checkpoint
    resumed.on_trial_complete("t2", {"loss": 0.3, "training_iteration": 2})
    resumed.suggest("t3")
    resumed.on_trial_complete("t3", {"loss": 0.75}, error=True)
    study = optuna.load_study(study_name="s1", storage=uri)
    assert [(t.user_attrs["ray_trial_id"], t.state.name, t.value) for t in study.trials] == [
        ("t1", "COMPLETE", 0.5), ("t2", "COMPLETE", 0.3), ("t3", "FAIL", None)]
    assert study.trials[1].intermediate_values == {1: 0.4}, "the epochs it reported, once"


def test_a_broken_database_costs_a_warning_not_the_search(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher(uri)
    (tmp_path / "optuna.db").write_bytes(b"not a database any more" * 100)
    searcher._study_mirror._study = None  # as in a new process: the file is opened again
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"loss": 0.5})
    assert "trials are no longer copied there" in caplog.text
    assert searcher._ot_study.trials[0].value == 0.5, "the search's own study goes on"


def _write_study(uri: str, name: str, n: int) -> None:
    storage = studies.open_storage(uri)
    study = optuna.create_study(storage=storage, study_name=name)
    for i in range(n):
        study.tell(study.ask(), float(i))


def test_two_searches_at_once_write_one_new_file_without_corrupting_it(tmp_path: Path) -> None:
    """Both create the schema of a fresh file and write at once: the creation lock and
    SQLite's busy timeout keep it whole."""
    uri = f"sqlite:///{tmp_path}/optuna.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_study, args=(uri, f"search-{i}", 15)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    summaries = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(uri)}
    assert summaries == {"search-0": 15, "search-1": 15}


@pytest.mark.slow
def test_a_real_search_persists_its_study_and_summarises_its_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = run_cli(["calotune.search", SPACE, "--home", str(home), "--trials", "3", "--max-epochs", "2",
                    "--events", "400", "--seed", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert "[3/3 done]" in log and "· running" in log, "the progress lines of a log file (not a TTY)"
    assert "\r" not in log, "no progress bar without a terminal"
    client = mlflow_client(home)
    exp = client.get_experiment_by_name(SPACE)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on training runs"
    [parent] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("calotune.kind") == "search"]
    tags, name = parent.data.tags, parent.data.tags["calotune.search"]

    db = home / "optuna.db"
    assert tags["calotune.optuna_dashboard"] == f"optuna-dashboard sqlite:///{db.resolve()}"
    assert f"optuna-dashboard sqlite:///{db.resolve()}" in log
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    trial_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("calotune.kind") == "trial"]
    assert len(study.trials) == len(trial_runs) == 3
    assert all(t.state.is_finished() for t in study.trials)
    assert {t.user_attrs["ray_trial_id"] for t in study.trials} == {
        r.data.tags["calotune.trial_id"] for r in trial_runs}, "one study trial per trial run"

    best = tags["calotune.best_trial"]
    assert tags["calotune.best_run"] == next(r.info.run_id for r in trial_runs
                                             if r.data.tags["calotune.trial_id"] == best)
    assert tags["calotune.baseline_trial"] != "none" and "calotune.baseline_run" in tags
    note = tags["mlflow.note.content"]
    assert f"runs/{tags['calotune.best_run']})" in note and "| **mean_separation** |" in note
    assert "optuna-dashboard" in note and "python -m calotune.dashboard --home" in note
    metrics = parent.data.metrics
    assert metrics["n_complete"] + metrics["n_pruned"] + metrics["n_failed"] == 3
    assert "best_test_mean_separation" in metrics and "default_test_mean_separation" in metrics
    assert any(k.startswith("best.") for k in parent.data.params)
    assert not any(k in r.data.metrics for r in trial_runs for k in ("time_this_iter_s", "pid", "timestamp")), \
        "Ray's bookkeeping is no trial metric"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
