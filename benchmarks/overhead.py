"""Per-trial platform overhead: the same tiny trial N times, three ways, interleaved.

1. plain Optuna: an in-process loop calling the worker function (the floor);
2. raw Ray Tune: a minimal function trainable + OptunaSearch, no checkpoints, no callbacks;
3. calotune: the Tuner the search builds, under the search's Ray settings (``_init_ray``),
   with its checkpoint policy (here one checkpoint per trial, after its last epoch) and the
   MLflow callback (its queue flushed inside the timing).

All three call the identical worker function (``calotune.tuning.worker.train``) on the
same data with the trial context the search itself builds (``trial_context``), so the
differences are what each layer costs per trial. The three are run in turn, ``--repeats``
times, and each figure is the median with its range. Ray's start-up is timed separately.
Run::

    python benchmarks/overhead.py --trials 50 --repeats 3 --json overhead.json

The JSON holds ``ratio_vs_plain`` (calotune / plain Optuna, Ray start-up excluded),
``overhead_over_raw_ray_s`` (per trial), ``ray_init_s`` and the three wall times, and
(``--startup-runs``) ``startup_fixed_s``: a tiny search's fixed cost besides Ray's start-up,
with its phases under ``startup``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import optuna
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.spec import SchedulerSpec, load_spec
from calotune.tuning.orchestrate import _init_ray, trial_context
from calotune.tuning.worker import train

log = logging.getLogger("bench")


def plain_optuna(spec, ctx, splits, trials: int) -> float:
    """In-process Optuna loop calling the worker function directly (the floor)."""
    metric = ctx.objectives[0][0]

    def objective(trial: optuna.Trial) -> float:
        last: dict = {}
        train(ctx, spec.suggest(trial), splits, lambda m, _c: last.update(m), device=torch.device("cpu"))
        return last[metric]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - t0


def calotune_search(spec, ctx, splits, trials: int, concurrent: int, root: Path) -> tuple[float, float]:
    """calotune's Tuner (Ray Tune, actor reuse, checkpoints, MLflow callback); (init s, fit s)."""
    import ray

    from calotune.tracking.mlflow_tracker import Tracker, default_tracking_uri
    from calotune.tuning.runner import MlflowTrialCallback, make_tuner

    root.mkdir(parents=True, exist_ok=True)
    saved_env = dict(os.environ)
    t0 = time.perf_counter()
    _init_ray(None)  # the search's own Ray settings (snapshot interval, log levels, ...)
    init_s = time.perf_counter() - t0
    try:
        uri = default_tracking_uri(root)
        name = f"bench-{concurrent}"
        Tracker(uri, spec.name, root / "artifacts").create_search(name, {}, {})
        callback = MlflowTrialCallback(uri, spec.name, name, str(root / "artifacts"), ctx.max_epochs)
        tuner = make_tuner(
            spec=spec, ctx=ctx, data_ref=ray.put(splits), baseline=spec.defaults({}),
            storage_path=root / "ray", run_name=name, seed=0, trials=trials, callback=callback,
            max_concurrent=concurrent, resources=spec.resources, restore=False,
        )
        t1 = time.perf_counter()
        tuner.fit()
        callback.flush()  # the MLflow writes are part of the cost, even when made off the loop
        return init_s, time.perf_counter() - t1
    finally:
        ray.shutdown()
        os.environ.clear()  # _init_ray's settings must not leak into the raw Ray arm
        os.environ.update(saved_env)


def raw_ray(spec, ctx, splits, trials: int, root: Path) -> tuple[float, float]:
    """A minimal Ray Tune search over the same trial: (init s, fit s)."""
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    metric, mode = ctx.objectives[0]
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    try:
        def trainable(config, data_ref):
            torch.set_num_threads(1)
            data = ray.get(data_ref[0])
            train(ctx, config, data, lambda m, _c: tune.report(m), device=torch.device("cpu"))

        searcher = OptunaSearch(space=spec.suggest, metric=metric, mode=mode,
                                sampler=optuna.samplers.TPESampler(seed=0))
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, data_ref=[ray.put(splits)]), {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, max_concurrent_trials=1,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="raw", storage_path=str(root / "raw"), verbose=0),
        )
        t1 = time.perf_counter()
        tuner.fit()
        return init_s, time.perf_counter() - t1
    finally:
        ray.shutdown()


def tiny_search_startup(root: Path, source: Path | None = None) -> dict[str, float]:
    """One ``python -m calotune.search zdc_swiglu_tiny`` from a fresh home: its phases.

    ``source``: run another tree's calotune (``git archive`` of an older commit) instead of
    this one, with the same interpreter and packages (``--startup-before``).

    The search records where its fixed cost goes (``ray_init_s``, ``setup_s`` before Tune
    starts, ``first_report_s`` from Tuner.fit to the first epoch reported, ``finish_s``
    for scoring, plots, registration and the summary); the process's own wall time adds
    interpreter start, imports and exit. ``fixed_s`` is everything but Ray's start-up and
    the trials' steady state (from the first report to the end of the trials), the figure
    issue 16 sets at 8 s.
    """
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    home = root / "home"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(source)} if source is not None else None
    proc = subprocess.run([sys.executable, "-m", "calotune.search", "zdc_swiglu_tiny", "--home", str(home),
                           "--quiet"], capture_output=True, text=True, cwd=source or root, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tiny search failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("zdc_swiglu_tiny")
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("calotune.kind") == "search")
    m = run.data.metrics
    phases = {k: float(m[k]) for k in ("ray_init_s", "setup_s", "first_report_s", "search_wall_s", "finish_s",
                                        "total_wall_s")}
    phases["process_wall_s"] = wall
    phases["outside_search_s"] = wall - phases["total_wall_s"]  # interpreter, imports, exit
    phases["fixed_s"] = wall - phases["ray_init_s"] - (phases["search_wall_s"] - phases["first_report_s"])
    return phases


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--ddp-trials", type=int, default=2,
                   help="also time this many trials as 2-worker DDP TorchTrainers (0: skip)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the three ways")
    p.add_argument("--startup-runs", type=int, default=3,
                   help="also run the tiny search CLI this many times, interleaved with the rounds, and "
                        "report its fixed start-up and tear-down (0: skip)")
    p.add_argument("--startup-before", type=Path, metavar="DIR",
                   help="also run the tiny search CLI of this source tree (e.g. git archive of an older "
                        "commit) as often, each run right before this tree's, and report both")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    torch.set_num_threads(1)
    spec = dataclasses.replace(load_spec("zdc_swiglu_tiny"), scheduler=SchedulerSpec(type="none"))
    detector = get_detector(spec.detector, **spec.geometry)
    splits = split(detector.synthesize(spec.data.events, seed=1), seed=0)
    ctx = trial_context(spec, detector, seed=0)  # the very mapping the search uses
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    walls: dict[str, list[float]] = {"plain_optuna_s": [], "raw_ray_s": [], "calotune_s": [],
                                     "ray_init_s": []}
    startups: list[dict[str, float]] = []
    before: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:

        def startup(r: int) -> None:  # the older tree first, then this one: pairs under the same load
            if args.startup_before is not None:
                before.append(tiny_search_startup(Path(tmp) / f"b{r}", args.startup_before.resolve()))
            startups.append(tiny_search_startup(Path(tmp) / f"s{r}"))

        for r in range(args.repeats):  # interleaved: a load change hits all three alike
            walls["plain_optuna_s"].append(plain_optuna(spec, ctx, splits, args.trials))
            init_s, fit_s = raw_ray(spec, ctx, splits, args.trials, Path(tmp) / f"r{r}")
            walls["raw_ray_s"].append(fit_s)
            walls["ray_init_s"].append(init_s)
            init_s, fit_s = calotune_search(spec, ctx, splits, args.trials, 1, Path(tmp) / f"c{r}")
            walls["calotune_s"].append(fit_s)
            walls["ray_init_s"].append(init_s)
            if r < args.startup_runs:
                startup(r)
        for r in range(args.repeats, args.startup_runs):
            startup(r)
        ddp_s = None
        if args.ddp_trials:
            ddp_spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, workers_per_trial=2))
            _, fit_s = calotune_search(ddp_spec, ctx, splits, args.ddp_trials, 1, Path(tmp) / "ddp")
            ddp_s = fit_s / args.ddp_trials
    med = {k: statistics.median(v) for k, v in walls.items()}
    results = {
        "trials": args.trials, "repeats": args.repeats, "epochs_per_trial": ctx.max_epochs,
        "geometry": asdict(ctx)["geometry"],
        **med,
        "ranges": {k: _summary(v) for k, v in walls.items()},
        "ratio_vs_plain": med["calotune_s"] / med["plain_optuna_s"],
        "raw_ray_ratio_vs_plain": med["raw_ray_s"] / med["plain_optuna_s"],
        "overhead_over_raw_ray_s": (med["calotune_s"] - med["raw_ray_s"]) / args.trials,
        "overhead_over_plain_s": (med["calotune_s"] - med["plain_optuna_s"]) / args.trials,
        "plain_s_per_trial": med["plain_optuna_s"] / args.trials,
        "ddp_2_workers_s_per_trial": ddp_s,
    }
    if startups:
        results["startup"] = {k: _summary([run[k] for run in startups]) for k in startups[0]}
        results["startup_fixed_s"] = results["startup"]["fixed_s"]["median"]
    if before:
        results["startup_before"] = {k: _summary([run[k] for run in before]) for k in before[0]}
        results["startup_fixed_before_s"] = results["startup_before"]["fixed_s"]["median"]
        results["startup_before_source"] = str(args.startup_before)
    log.info(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
