"""Warm starts (calotune.tuning.warmstart): mapping earlier trials onto a changed space,
finding sources in a tracking store, seeding Optuna, the record, and one real search."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from calotune.errors import UserError
from calotune.spec import Param, load_spec, parse_spec
from calotune.tuning import warmstart
from calotune.tuning.orchestrate import SearchRequest, baseline_config, plan_search

LR = Param("lr_generator", "float", low=1e-4, high=5e-3, log=True)
MASK = Param("mask_loss_weight", "float", low=0.0, high=2.0)
RANK = Param("low_rank", "int", low=2, high=16, step=2)
MOE = Param("use_moe", "categorical", choices=(False, True))
EXPERTS = Param("moe_experts", "int", low=2, high=8, when={"use_moe": True})
SPACE = (LR, MASK, RANK, MOE, EXPERTS)
BASELINE = {"lr_generator": 1e-3, "mask_loss_weight": 0.5, "low_rank": 8, "use_moe": False}


# --- mapping rules ---------------------------------------------------------------------
def test_unknown_parameters_are_dropped_and_new_ones_filled_from_the_baseline() -> None:
    mapped = warmstart.map_config({"lr_generator": "0.002", "dropout": "0.1", "critic_width": "64"},
                                  SPACE, BASELINE)
    assert mapped.values == {"lr_generator": 0.002, "mask_loss_weight": 0.5, "low_rank": 8, "use_moe": False}
    assert mapped.dropped == ["critic_width", "dropout"]
    assert mapped.filled == ["mask_loss_weight", "low_rank", "use_moe"]
    assert not mapped.clipped and not mapped.refused


def test_values_just_outside_a_range_are_clipped_and_snapped_to_the_step() -> None:
    # mask: 2.3 is 0.15 of the width beyond 2.0; low_rank 7 is off the step-2 grid;
    # lr 6e-3 is ~0.05 of the log width beyond 5e-3
    mapped = warmstart.map_config({"lr_generator": "0.006", "mask_loss_weight": "2.3", "low_rank": "7",
                                   "use_moe": "False"}, SPACE, BASELINE)
    assert mapped.values is not None
    assert mapped.values["mask_loss_weight"] == 2.0
    assert mapped.values["lr_generator"] == pytest.approx(5e-3)
    assert mapped.values["low_rank"] in (6, 8) and isinstance(mapped.values["low_rank"], int)
    assert sorted(mapped.clipped) == ["low_rank", "lr_generator", "mask_loss_weight"]


@pytest.mark.parametrize("recorded, words", [
    ({"mask_loss_weight": "3.0"}, "mask_loss_weight=3 lies outside [0, 2]"),  # 0.5 of the width beyond
    ({"lr_generator": "0.05"}, "lr_generator=0.05 lies outside"),  # a factor 10 beyond a factor-50 range
    ({"use_moe": "maybe"}, "use_moe=maybe is not one of the choices"),
    ({"low_rank": "wide"}, "is not a number"),
])
def test_values_far_outside_or_invalid_refuse_the_trial(recorded: dict[str, str], words: str) -> None:
    mapped = warmstart.map_config(recorded, SPACE, BASELINE)
    assert mapped.values is None
    assert words in mapped.refused


def test_a_conditional_parameter_follows_the_new_spaces_parents() -> None:
    on = warmstart.map_config({"use_moe": "True", "moe_experts": "4"}, SPACE, BASELINE)
    off = warmstart.map_config({"use_moe": "False", "moe_experts": "4"}, SPACE, BASELINE)
    new = warmstart.map_config({"use_moe": "True"}, SPACE, BASELINE)
    assert on.values is not None and on.values["moe_experts"] == 4 and on.values["use_moe"] is True
    assert off.values is not None and "moe_experts" not in off.values and "moe_experts" in off.dropped
    assert new.values is not None and new.values["moe_experts"] == EXPERTS.project(None)  # filled
    assert "moe_experts" in new.filled


# --- seeding Optuna --------------------------------------------------------------------
def _tiny_spec(**extra: Any):
    raw = {"family": "zdc_swiglu", "detector": "zdc",
           "geometry": {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6},
           "data": {"events": 400}, "objective": {"metric": "mean_separation", "mode": "min"},
           "budget": {"trials": 4, "max_epochs": 2},
           "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 5e-3, "log": True},
                      "mask_loss_weight": {"type": "float", "low": 0.0, "high": 2.0}}, **extra}
    return parse_spec(raw, "tiny.yaml")


def _seeds(n: int, good_lr: float = 3e-4) -> tuple[warmstart.SeedTrial, ...]:
    """n complete earlier trials over a grid, scored by distance to ``good_lr`` (log)."""
    out = []
    for i in range(n):
        lr = 1e-4 * (50 ** (i / (n - 1)))
        mask = 2.0 * ((i * 7) % n) / n
        out.append(warmstart.SeedTrial({"lr_generator": lr, "mask_loss_weight": mask}, "complete",
                                       (abs(math.log(lr / good_lr)),), 2, "search old"))
    out.append(warmstart.SeedTrial({"lr_generator": 4e-3, "mask_loss_weight": 1.0}, "pruned", (2.5,), 1,
                                   "search old"))
    return tuple(out)


def _searcher(spec, warm: warmstart.WarmStart | None, baseline: dict[str, Any]):
    from calotune.tuning.algorithms import make_sampler
    from calotune.tuning.runner import FailAwareOptunaSearch

    return FailAwareOptunaSearch(
        space=spec.suggest, metric="mean_separation", mode="min",
        points_to_evaluate=warmstart.points_to_evaluate(warm, baseline), sampler=make_sampler("tpe", 0),
        warm_trials=warmstart.frozen_trials(spec, warm.trials) if warm else None)


def test_seeded_study_starts_from_production_then_baseline_and_tpe_uses_the_history() -> None:
    from optuna.trial import TrialState

    spec = _tiny_spec()
    baseline = baseline_config(spec)
    production = {"lr_generator": 2e-4, "mask_loss_weight": 0.25}
    warm = warmstart.WarmStart("auto", ("models:/zdc-g1/1", "search old"), production, _seeds(20))
    searcher = _searcher(spec, warm, baseline)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 20
    assert sum(t.state == TrialState.PRUNED and t.intermediate_values == {1: 2.5} for t in trials) == 1
    assert all(t.user_attrs.get(warmstart.TAG) == "search old" for t in trials if t.state != TrialState.WAITING)

    assert searcher.suggest("t0") == production  # the first trial evaluated
    assert searcher.suggest("t1") == baseline
    # From trial 3 on TPE samples from a model of the 21 seeded trials (past its 10 random
    # start-up trials): its proposals crowd around the good region, lr ~ 3e-4.
    warm_lrs = [searcher.suggest(f"t{i}")["lr_generator"] for i in range(2, 10)]
    cold = _searcher(spec, None, baseline)
    cold.suggest("c0")
    cold_lrs = [cold.suggest(f"c{i}")["lr_generator"] for i in range(1, 9)]

    def spread(lrs: list[float]) -> float:
        return sorted(abs(math.log(x / 3e-4)) for x in lrs)[len(lrs) // 2]

    assert spread(warm_lrs) < 0.5 * spread(cold_lrs), (warm_lrs, cold_lrs)


def test_seeded_trials_survive_the_searchers_pickle() -> None:
    import pickle

    spec = _tiny_spec()
    warm = warmstart.WarmStart("auto", ("search old",), None, _seeds(5))
    searcher = pickle.loads(pickle.dumps(_searcher(spec, warm, baseline_config(spec))))
    assert len([t for t in searcher._ot_study.get_trials() if warmstart.TAG in t.user_attrs]) == 6


# --- sources in a tracking store --------------------------------------------------------
def _store(tmp_path: Path) -> str:
    """A store with one finished tiny search (4 trials) whose trial 1 is in production, and
    a search of another family; written with calotune's Tracker, no Ray."""
    from calotune.detectors import get_detector
    from calotune.tracking.mlflow_tracker import Tracker
    from calotune.tracking.registry import registered_model_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec("zdc_swiglu_tiny")
    name = registered_model_name("zdc", get_detector("zdc", **spec.geometry).geometry_dict(),
                                 get_detector("zdc").geometry_dict())
    tracker = Tracker(uri, "zdc_swiglu_tiny", tmp_path / "artifacts")
    tracker.create_search("zdc_swiglu_tiny-20261202-000000-aaaa",
                          {"family": "zdc_swiglu", "detector": "zdc", "max_epochs": "2", "registered_model": name}, {})
    rows = [  # lr, mask, state, score, epochs
        ("0.0002", "0.3", "complete", 0.20, 2), ("0.001", "0.8", "complete", 0.15, 2),
        ("0.004", "1.9", "pruned", 0.40, 1), ("0.0005", "9.0", "complete", 0.10, 2),  # 9.0: refused
        ("0.002", "1.0", "failed", None, 1),
    ]
    runs = []
    for i, (lr, mask, state, score, epochs) in enumerate(rows):
        run = tracker.trial_run(f"t_{i:05d}", {"lr_generator": lr, "mask_loss_weight": mask, "dropout": "0.0"})
        tracker.log_metrics(run, {"training_iteration": epochs, **({"mean_separation": score} if score else {})})
        tracker.end_trial(f"t_{i:05d}", state)
        runs.append(run)
    tracker.set_tags(tracker.parent_run_id, {"calotune.state": "finished"})
    tracker.end_search("FINISHED")
    tracker.register(runs[1], "model", name, "candidate", {})
    tracker.client.set_registered_model_alias(name, "production", "1")
    other = Tracker(uri, "hgcal_score_tiny", tmp_path / "artifacts")
    other.create_search("hgcal_score_tiny-20261202-000000-bbbb", {"family": "hgcal_score", "detector": "hgcal"}, {})
    other.set_tags(other.parent_run_id, {"calotune.state": "finished"})
    other.end_search("FINISHED")
    full = Tracker(uri, "zdc_swiglu", tmp_path / "artifacts")  # same family, the full geometry
    full.create_search("zdc_swiglu-20261202-000000-eeee", {"family": "zdc_swiglu", "detector": "zdc",
                                                            "registered_model": "zdc"}, {})
    full.trial_run("t_00000", {"lr_generator": "0.001"})
    full.set_tags(full.parent_run_id, {"calotune.state": "finished"})
    full.end_search("FINISHED")
    return uri


def _plan(flag: str, uri: str):
    from calotune.detectors import get_detector

    spec = load_spec("zdc_swiglu_tiny")
    return warmstart.plan_warm_start(flag, spec, get_detector("zdc", **spec.geometry), uri,
                                     baseline_config(spec))


def test_bare_flag_takes_production_first_and_the_familys_searches(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    uri = _store(tmp_path)
    with caplog.at_level("INFO", logger="calotune.tuning.warmstart"):
        warm = _plan("auto", uri)
    assert warm.sources[0].startswith("models:/zdc-g") and warm.sources[0].endswith("/1")
    assert warm.sources[1:] == ("search zdc_swiglu_tiny-20261202-000000-aaaa",)
    assert warm.first == {"lr_generator": 0.001, "mask_loss_weight": 0.8}  # production's configuration
    states = sorted((s.state, s.values[0]) for s in warm.trials)
    assert states == [("complete", 0.15), ("complete", 0.2), ("pruned", 0.4)]  # failed / far out: not seeded
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("warm start from search"))
    assert "5 trial(s), 3 seeded, 2 not seeded (failed, mask_loss_weight)" in line
    assert "dropped (not in this space): dropout" in line
    params, tags = warmstart.record(warm)
    assert params == {"warm_start": "auto", "warm_start_trials": "3"}
    assert tags[warmstart.TAG].startswith("models:/zdc-g")


def test_named_search_and_model_sources(tmp_path: Path) -> None:
    uri = _store(tmp_path)
    by_search = _plan("zdc_swiglu_tiny-20261202-000000-aaaa", uri)
    assert by_search.first == {"lr_generator": 0.001, "mask_loss_weight": 0.8}  # the best complete seed
    assert len(by_search.trials) == 3
    name = by_search.sources[0]
    by_model = _plan(f"models:/{_plan('auto', uri).sources[0].split('/')[1]}/1", uri)
    assert by_model.first == {"lr_generator": 0.001, "mask_loss_weight": 0.8}
    assert name == "search zdc_swiglu_tiny-20261202-000000-aaaa"


@pytest.mark.parametrize("flag, words", [
    ("zdc_swiglu_tiny-20990101-000000-ffff", "no search of that name"),
    ("hgcal_score_tiny-20261202-000000-bbbb", "is a search of family 'hgcal_score'"),
    ("models:/zdc/7", "no registered model 'zdc'"),
    ("zdc_swiglu-20261202-000000-eeee", "ran on the detector geometry of registered model 'zdc'"),
    ("models:/zdc@", "not understood"),
])
def test_a_bad_source_is_refused_naming_the_flag(tmp_path: Path, flag: str, words: str) -> None:
    uri = _store(tmp_path)
    with pytest.raises(UserError, match="--warm-start") as info:
        _plan(flag, uri)
    assert words in str(info.value)


def test_bare_flag_on_an_empty_store_is_refused(tmp_path: Path) -> None:
    from calotune.tracking.mlflow_tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "zdc_swiglu_tiny")
    with pytest.raises(UserError, match="--warm-start: nothing to start from"):
        _plan("auto", uri)


def test_cli_refuses_a_warm_start_without_a_store_and_writes_nothing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from calotune.search import main

    home = tmp_path / "home"
    assert main(["zdc_swiglu_tiny", "--warm-start", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "--warm-start auto: no MLflow store" in err and len(err.strip().splitlines()) == 1
    assert not home.exists()


def test_resume_keeps_the_warm_start_it_was_started_with(tmp_path: Path) -> None:
    """A resumed search takes its seeds from Tune's snapshot; a different --warm-start, or
    one added to a search started cold, is refused before anything changes."""
    from calotune.tracking.mlflow_tracker import Tracker

    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    for name, warm in (("zdc_swiglu_tiny-20261202-000000-cccc", {"warm_start": "auto"}),
                       ("zdc_swiglu_tiny-20261202-000000-dddd", {})):
        tracker = Tracker(uri, "zdc_swiglu_tiny")
        tracker.create_search(name, {"trials": "4", "max_epochs": "2", "seed": "0", **warm}, {})
        tracker.set_tags(tracker.parent_run_id, {"calotune.state": "interrupted"})
        tracker.end_search("KILLED")
    with pytest.raises(UserError, match=r"--warm-start models:/zdc/1: search .* was started with auto"):
        plan_search(SearchRequest("zdc_swiglu_tiny", resume="zdc_swiglu_tiny-20261202-000000-cccc",
                                  warm_start="models:/zdc/1", home=home))
    with pytest.raises(UserError, match=r"--warm-start auto: search .* was started without a warm start"):
        plan_search(SearchRequest("zdc_swiglu_tiny", resume="zdc_swiglu_tiny-20261202-000000-dddd",
                                  warm_start="auto", home=home))


# --- one real search -------------------------------------------------------------------
@pytest.mark.slow
def test_warm_started_search_begins_from_production_and_records_its_lineage(tmp_path: Path) -> None:
    """Two real tiny searches on one store: the second, with a bare --warm-start, evaluates
    the production model's configuration first and carries the lineage tag."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"

    def run(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "calotune.search", "zdc_swiglu_tiny", "--trials", "3", "--max-epochs", "1",
             "--home", str(home), *extra], cwd=tmp_path, capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run("--seed", "1")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = next(m.name for m in client.search_registered_models() if m.name.startswith("zdc-g"))
    candidate = client.get_model_version_by_alias(name, "candidate")
    client.set_registered_model_alias(name, "production", candidate.version)  # as promote would
    production_params = client.get_run(candidate.run_id).data.params

    # one trial at a time: trials start in the order the searcher suggests them
    second = run("--seed", "2", "--warm-start", "--max-concurrent", "1")
    assert f"warm start: the first trial is the configuration of models:/{name}/{candidate.version}" in second.stderr
    exp = client.get_experiment_by_name("zdc_swiglu_tiny")
    searches = client.search_runs([exp.experiment_id], "tags.`calotune.kind` = 'search'",
                                  order_by=["attributes.start_time DESC"])
    latest = searches[0]
    sources = latest.data.tags[warmstart.TAG].split(", ")
    assert sources[0] == f"models:/{name}/{candidate.version}"
    assert f"search {searches[1].data.tags['calotune.search']}" in sources
    assert int(latest.data.params["warm_start_trials"]) >= 1 and latest.data.params["warm_start"] == "auto"
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{latest.info.run_id}'")
    first = min(trials, key=lambda r: (r.info.start_time, r.info.run_name))
    assert {k: float(v) for k, v in first.data.params.items()} == \
        {k: float(production_params[k]) for k in first.data.params}
