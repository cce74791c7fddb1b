"""Per-trial platform overhead: the same tiny trial N times, calotune's search vs plain Optuna.

Both paths call the identical worker function (``calotune.tuning.worker.train``) with the
same data; the difference is what Ray Tune, the trial actors, checkpointing and the MLflow
callback cost per trial. Run:  python benchmarks/overhead.py --trials 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import optuna
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.spec import SchedulerSpec, load_spec
from calotune.tuning.orchestrate import trial_context
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
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    try:
        uri = default_tracking_uri(root)
        name = f"bench-{concurrent}"
        Tracker(uri, spec.name, root / "artifacts").create_search(name, {}, {})
        tuner = make_tuner(
            spec=spec, ctx=ctx, data_ref=ray.put(splits), baseline=spec.defaults({}),
            storage_path=root / "ray", run_name=name, seed=0, trials=trials,
            callback=MlflowTrialCallback(uri, spec.name, name, str(root / "artifacts"), ctx.max_epochs),
            max_concurrent=concurrent, resources=spec.resources, restore=False,
        )
        t1 = time.perf_counter()
        tuner.fit()
        return init_s, time.perf_counter() - t1
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--ddp-trials", type=int, default=2,
                   help="also time this many trials as 2-worker DDP TorchTrainers (0: skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    torch.set_num_threads(1)
    spec = dataclasses.replace(load_spec("zdc_swiglu_tiny"), scheduler=SchedulerSpec(type="none"))
    detector = get_detector(spec.detector, **spec.geometry)
    splits = split(detector.synthesize(spec.data.events, seed=1), seed=0)
    ctx = trial_context(spec, detector, seed=0)  # the very mapping the search uses
    plain = plain_optuna(spec, ctx, splits, args.trials)
    results = {"trials": args.trials, "epochs_per_trial": ctx.max_epochs, "plain_optuna_s": plain,
               "geometry": asdict(ctx)["geometry"]}
    with tempfile.TemporaryDirectory() as tmp:
        for concurrent in (1, 2):
            init_s, fit_s = calotune_search(spec, ctx, splits, args.trials, concurrent, Path(tmp))
            results[f"ray_init_s_c{concurrent}"] = init_s
            results[f"calotune_fit_s_c{concurrent}"] = fit_s
        if args.ddp_trials:
            ddp_spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, workers_per_trial=2))
            _, fit_s = calotune_search(ddp_spec, ctx, splits, args.ddp_trials, 1, Path(tmp) / "ddp")
            results["ddp_2_workers_s_per_trial"] = fit_s / args.ddp_trials
    results["plain_s_per_trial"] = plain / args.trials
    results["overhead_per_trial_s_serial"] = (results["calotune_fit_s_c1"] - plain) / args.trials
    log.info(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
