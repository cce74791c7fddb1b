"""Search algorithms as data: every sampler and scheduler validated, and run for real.

The real runs share one Ray instance and call the Tuner the search builds
(``runner.make_tuner``) on the tiny ZDC space, two trials each: the slow part of a search
(the MLflow store, plots, registration) is tested elsewhere and not repeated per algorithm.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.spec import Objective, SamplerSpec, SchedulerSpec, load_spec, parse_spec
from calotune.tuning import algorithms

BASE = {"name": "a", "family": "zdc_swiglu", "detector": "zdc",
        "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 1e-3},
                   "use_moe": {"type": "categorical", "choices": [False, True]}}}
TWO = [{"metric": "mean_separation", "mode": "min"}, {"metric": "gen_time_ms", "mode": "min"}]


@pytest.mark.parametrize("extra, key, words", [
    ({"sampler": "bohb"}, "sampler", "unknown sampler 'bohb'"),
    ({"sampler": {"type": "cmaes"}, "objectives": TWO}, "sampler", "optimises one objective"),
    ({"sampler": "random", "objectives": TWO, "scheduler": {"type": "asha"}}, "scheduler.type",
     "stops trials by one number"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.mutate", "is required with pbt"),
    ({"sampler": {"type": "random", "multivariate": True}}, "sampler", "options of tpe"),
    ({"sampler": 3}, "sampler", "must be a name"),
])
def test_algorithms_are_refused_with_the_rule(extra: dict, key: str, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_spec({**BASE, **extra}, "a.yaml")
    assert str(info.value).startswith(f"a.yaml: {key}:") and words in str(info.value), str(info.value)


def test_cmaes_refuses_a_space_of_categoricals_only() -> None:
    raw = {**BASE, "sampler": "cmaes", "params": {"use_moe": {"type": "categorical", "choices": [False, True]}}}
    with pytest.raises(UserError, match="every parameter of the space is categorical"):
        parse_spec(raw, "a.yaml")


def test_defaults_follow_the_number_of_objectives() -> None:
    one = parse_spec(BASE, "a.yaml")
    two = parse_spec({**BASE, "objectives": TWO}, "a.yaml")
    assert (one.sampler.type, one.scheduler.type) == ("tpe", "asha")
    assert (two.sampler.type, two.scheduler.type) == ("nsga2", "moasha")
    tpe = parse_spec({**BASE, "sampler": {"type": "tpe", "multivariate": True}}, "a.yaml")
    sampler = algorithms.make_sampler("tpe", 0, {"multivariate": tpe.sampler.multivariate})
    assert sampler._multivariate and sampler._group


@pytest.mark.parametrize("sampler", sorted(algorithms.SAMPLERS))
def test_every_sampler_pickles_with_its_state(sampler: str) -> None:
    """Ray Tune pickles the searcher into every experiment snapshot: a sampler that cannot
    be pickled (Optuna 5.1's NSGA-II holds a thread lock) kills the search at its start."""
    import pickle

    import optuna

    study = optuna.create_study(sampler=algorithms.make_sampler(sampler, 0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=3)
    clone = pickle.loads(pickle.dumps(study.sampler))
    study.sampler = clone
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=2)
    assert len(study.trials) == 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    import ray

    from calotune.tuning.orchestrate import trial_context

    spec = load_spec("zdc_swiglu_tiny")
    detector = get_detector(spec.detector, **spec.geometry)
    data = split(detector.synthesize(200, seed=1), seed=0)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        yield spec, trial_context(spec, detector, 0), ray.put(data), tmp_path_factory.mktemp("algo")
    finally:
        ray.shutdown()


def _fit(tiny, name: str, *, sampler: str = "tpe", scheduler: str = "none", trials: int = 2, epochs: int = 1,
         objectives: tuple[Objective, ...] | None = None, data_fractions: tuple[float, ...] | None = None):
    from ray import tune

    from calotune.tuning.runner import make_tuner

    spec, ctx, data_ref, root = tiny
    spec = dataclasses.replace(spec, sampler=SamplerSpec(type=sampler), scheduler=SchedulerSpec(
        type=scheduler, grace_period=1, reduction_factor=2, data_fractions=data_fractions), max_epochs=epochs,
        objectives=objectives or spec.objectives)
    ctx = dataclasses.replace(ctx, max_epochs=epochs, objectives=tuple((o.metric, o.mode) for o in spec.objectives),
                              data_fractions=algorithms.epoch_fractions(data_fractions, 1, 2, epochs))
    tuner = make_tuner(spec=spec, ctx=ctx, data_ref=data_ref, baseline=spec.defaults({}), storage_path=Path(root),
                       run_name=name, seed=0, trials=trials, callback=tune.Callback(), max_concurrent=2,
                       resources=spec.resources, restore=False)
    grid = tuner.fit()
    assert len(grid) == trials and not grid.errors, grid.errors
    values = [r.metrics.get("mean_separation") for r in grid]
    assert all(v is not None and math.isfinite(v) for v in values), values
    return grid


@pytest.mark.parametrize("sampler", sorted(algorithms.SAMPLERS))
def test_every_sampler_drives_the_define_by_run_space(sampler: str) -> None:
    """Each sampler proposes valid points of a conditional space (Optuna in-process)."""
    import optuna

    spec = parse_spec({**BASE, "sampler": sampler, "params": {
        **BASE["params"], "moe_experts": {"type": "int", "low": 2, "high": 6, "when": {"use_moe": True}}}},
        "a.yaml")
    study = optuna.create_study(sampler=algorithms.make_sampler(sampler, 0))
    study.optimize(lambda t: (v := spec.suggest(t))["lr_generator"] * (2 if v["use_moe"] else 1), n_trials=12)
    assert len(study.trials) == 12 and all(1e-4 <= t.params["lr_generator"] <= 1e-3 for t in study.trials)
    assert all(("moe_experts" in t.params) == t.params["use_moe"] for t in study.trials)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", sorted(set(algorithms.SAMPLERS) - {"tpe", "nsga2"}))
def test_samplers_run_a_real_search(tiny, sampler: str) -> None:
    """Every sampler through Ray Tune (pickled with the searcher, asked from Tune's loop);
    tpe and nsga2 run in the scheduler tests below and in every end-to-end search."""
    grid = _fit(tiny, f"s-{sampler}", sampler=sampler)
    assert {"lr_generator", "mask_loss_weight"} <= set(grid[0].config)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [s for s in algorithms.SCHEDULERS if s not in ("none", "pbt")])
def test_every_scheduler_runs_a_real_search(tiny, scheduler: str) -> None:
    """moasha on fidelity against speed (two objectives); asha on data size as a fidelity;
    pbt's real search (a population, exploits recorded) is tests/test_pbt.py's."""
    from calotune.tuning.runner import STOPPED_KEY, result_state

    two = (Objective("mean_separation", "min"), Objective("gen_time_ms", "min"))
    grid = _fit(tiny, f"h-{scheduler}", scheduler=scheduler, trials=3, epochs=2,
                sampler="nsga2" if scheduler == "moasha" else "tpe",
                objectives=two if scheduler == "moasha" else None,
                data_fractions=(0.5, 1.0) if scheduler == "asha" else None)
    assert max(r.metrics["training_iteration"] for r in grid) == 2
    for r in grid:
        epochs = r.metrics["training_iteration"]
        if scheduler == "moasha":  # both objectives ranked; a trial stopped early says where and why
            assert math.isfinite(r.metrics["gen_time_ms"])
            assert (epochs < 2) == (STOPPED_KEY in r.metrics), r.metrics
            if epochs < 2:
                assert r.metrics[STOPPED_KEY].startswith("MO-ASHA: ") and r.metrics["stopped_at_rung"] == 0
                assert result_state(r.metrics, 2) == ("pruned", r.metrics[STOPPED_KEY])
        if scheduler == "asha":  # the first rung on half the 140 training events, then all of them,
            # in whole batches of 64 (a short tail batch is skipped): 64 events, then 128
            fraction, events = (0.5, 64) if epochs == 1 else (1.0, 128)
            assert r.metrics["train_data_fraction"] == fraction
            assert r.metrics["train_events"] == events
            assert r.metrics["train_events_total"] == (64 if epochs == 1 else 192)


def test_n_startup_trials_reaches_the_sampler_and_defaults_to_optunas() -> None:
    assert algorithms.make_sampler("tpe", 0, {"n_startup_trials": 4})._n_startup_trials == 4
    assert algorithms.make_sampler("tpe", 0, {"n_startup_trials": None})._n_startup_trials == 10


def test_n_startup_trials_is_checked_and_kept_by_the_space(tmp_path) -> None:
    base = (Path(__file__).resolve().parents[1] / "search_spaces" / "zdc_swiglu_tiny.yaml").read_text()
    good = tmp_path / "good.yaml"
    good.write_text(base + "\nsampler: {type: tpe, n_startup_trials: 2}\n")
    assert load_spec(str(good)).sampler.n_startup_trials == 2
    for text, words in (("sampler: {type: random, n_startup_trials: 2}", "not of 'random'"),
                        ("sampler: {type: tpe, n_startup_trials: 0}", "must be >= 1"),
                        ("sampler: {type: tpe, n_startup_trials: true}", "n_startup_trials")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(base + "\n" + text + "\n")
        with pytest.raises(UserError) as info:
            load_spec(str(bad))
        assert "sampler" in str(info.value) and words in str(info.value)


def test_trials_stopped_early_are_pruned_in_optuna_as_in_mlflow() -> None:
    """A trial a scheduler stopped at a rung is "pruned" in MLflow and the summary; Optuna
    must say the same (Ray's OptunaSearch would call it COMPLETE with its early score), and
    keep its intermediate value so TPE can still rank it."""
    import optuna

    from calotune.tuning.runner import FAILED_KEY, STOPPED_KEY, FailAwareOptunaSearch

    searcher = FailAwareOptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)},
                                     metric="loss", mode="min", seed=0)
    for trial_id in ("stopped", "finished", "failed"):
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, {"loss": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"loss": 0.5, "training_iteration": 1, STOPPED_KEY: "ASHA: below"})
    searcher.on_trial_complete("finished", {"loss": 0.4, "training_iteration": 2})
    searcher.on_trial_complete("failed", {"loss": 0.4, FAILED_KEY: "non-finite loss"})
    trials = searcher._ot_study.trials
    assert [t.state.name for t in trials] == ["PRUNED", "COMPLETE", "FAIL"]
    assert trials[0].intermediate_values == {1: 0.5} and trials[1].value == 0.4
