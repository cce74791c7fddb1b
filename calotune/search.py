"""``python -m calotune.search SPACE``: run (or resume) a hyperparameter search.

Everything the user can get wrong (the space, the data, the tracking URI, the cluster
address) is checked before anything is written, so bad input leaves no half-made MLflow
runs or result folders behind: one message, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calotune.cli import configure_logging, run_cli
from calotune.errors import UserError

log = logging.getLogger("calotune.search")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calotune.search",
        description="Hyperparameter search over a calorimeter generative model "
                    "(Ray Tune + Optuna TPE + ASHA, tracked in MLflow).",
    )
    p.add_argument("space", help="search-space name in search_spaces/ (e.g. zdc_swiglu) or a YAML path")
    p.add_argument("--trials", type=int, help="number of trials (default: the space's budget.trials)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: budget.max_epochs)")
    p.add_argument("--data", type=Path, help="reference HDF5 file (default: built-in synthetic data)")
    p.add_argument("--events", type=int, help="synthetic events to generate when --data is absent")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--storage-path", help="Ray Tune results folder (default: ./.calotune/ray_results); "
                   "shared storage for multi-node clusters")
    p.add_argument("--address", help="existing Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, data split and training")
    p.add_argument("--resume", action="store_true", help="resume the latest interrupted search of SPACE")
    p.add_argument("--cpus-per-trial", type=float, help="override resources.cpus_per_trial")
    p.add_argument("--gpus-per-trial", type=float, help="override resources.gpus_per_trial")
    p.add_argument("--workers-per-trial", type=int, help="override resources.workers_per_trial (DDP)")
    p.add_argument("--max-concurrent", type=int, help="override resources.max_concurrent_trials")
    p.add_argument("--home", type=Path, default=Path(".calotune"),
                   help="project-local folder for the data cache, MLflow store and results")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: Path | None
    error: str | None
    epochs: int


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be > 0, but got {value}")


def prepare(args: argparse.Namespace):
    """Validate every input; returns (spec, detector, showers, data path, tracking uri, storage)."""
    from calotune.detectors import get_detector
    from calotune.spec import load_spec
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri

    for flag in ("trials", "max_epochs", "events", "workers_per_trial", "max_concurrent"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0, but got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, but got {args.gpus_per_trial}")
    spec = load_spec(args.space)
    overrides = {k: v for k, v in {
        "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
        "workers_per_trial": args.workers_per_trial, "max_concurrent_trials": args.max_concurrent,
    }.items() if v is not None}
    spec = dataclasses.replace(
        spec, resources={**spec.resources, **overrides},
        trials=args.trials or spec.trials, max_epochs=args.max_epochs or spec.max_epochs,
    )
    detector = get_detector(spec.detector, **spec.geometry)
    home = args.home.resolve()
    uri = resolve_tracking_uri(args.tracking_uri, home, must_exist=False)
    if args.data is not None:
        if not args.data.is_file():
            raise UserError(f"--data {args.data}: file does not exist")
        data_path = args.data.resolve()
    else:
        from calotune.data.cache import cached_synthetic

        home.mkdir(parents=True, exist_ok=True)
        options = {k: spec.data[k] for k in ("particle", "mode") if k in spec.data}
        data_path = cached_synthetic(detector, args.events or spec.data.get("events", 6000),
                                     spec.data.get("seed", 1), home / "data", **options)
    showers = detector.read(data_path)  # validates keys, shapes, dtypes, values before any write
    # A local folder, or an object-store URI (s3://, gs://) that Ray Tune writes through pyarrow.
    storage = args.storage_path if args.storage_path and "://" in args.storage_path else \
        Path(args.storage_path or home / "ray_results").resolve()
    return spec, detector, showers, data_path, uri, storage


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # calotune checkpoints every epoch on purpose (resume loses nothing); Tune's warning
    # about frequent experiment snapshots is expected, not actionable.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot Tune's experiment state every 2 s (the default is >= 10 s): a killed driver
    # then forgets at most the trials of its last 2 s. A snapshot takes milliseconds here.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # A failed trial's last result deliberately carries no score (see worker.train).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # "local": never join a cluster some other process happened to start here
            ray.init(address="local", include_dashboard=False, log_to_driver=os.environ.get("CALOTUNE_RAY_LOGS") == "1")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--address {address}: cannot connect to the Ray cluster ({exc})") from None


def _outcomes(result_grid) -> list[TrialOutcome]:
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from calotune.tuning.worker import FAILED_KEY

    out = []
    for r in result_grid:
        metrics = dict(r.metrics or {})
        ckpt = None
        if r.checkpoint is not None:
            ckpt = Path(r.checkpoint.path)
        elif metrics.get(CHECKPOINT_PATH_KEY):  # a DDP trial: Ray Train's checkpoint, by path
            ckpt = Path(metrics[CHECKPOINT_PATH_KEY])
        trial_id = metrics.get("trial_id") or Path(r.path).name
        error = str(r.error).strip().splitlines()[-1] if r.error else metrics.get(FAILED_KEY)
        out.append(TrialOutcome(
            trial_id=str(trial_id), config=dict(r.config or {}), metrics=metrics, checkpoint=ckpt,
            error=error,
            epochs=int(metrics.get("training_iteration", 0)),
        ))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    spec, detector, showers, data_path, uri, storage = prepare(args)
    args.data_path = data_path
    experiment = spec.name
    # Which search of this space to resume: recorded in --home, which works for local and
    # object-store storage alike (put --home on shared storage for cluster jobs).
    latest_file = args.home.resolve() / "searches" / f"{spec.name}.latest"
    if args.resume:
        if not latest_file.is_file():
            raise UserError(f"--resume: no search of {spec.name!r} to resume under {latest_file.parent}; "
                            f"run without --resume to start one")
        run_name = latest_file.read_text().strip()
    else:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    import ray

    from calotune.data.splits import split
    from calotune.models.registry import config_fields
    from calotune.tracking.mlflow_tracker import Tracker
    from calotune.tuning.runner import MlflowTrialCallback, make_tuner
    from calotune.tuning.worker import TrialContext

    splits = split(showers, spec.data.get("validation_fraction", 0.15),
                   spec.data.get("test_fraction", 0.15), seed=args.seed)
    data_hash = _file_hash(data_path)
    model_defaults = {name: f.default for name, f in config_fields(spec.family).items()
                      if f.default is not dataclasses.MISSING}
    baseline = spec.defaults({**model_defaults, **spec.fixed})
    log.info("search %s: %s on %s, %d trials x %d epochs; data %s (%d train / %d validation / "
             "%d test events)", run_name, spec.family, spec.detector, spec.trials, spec.max_epochs,
             data_path, len(splits.train), len(splits.validation), len(splits.test))

    _init_ray(args.address)
    try:
        home = args.home.resolve()
        tracker = Tracker(uri, experiment, home / "artifacts")
        tracker.start_search(run_name, {
            "space": spec.source, "family": spec.family, "detector": spec.detector,
            "trials": spec.trials, "max_epochs": spec.max_epochs, "seed": args.seed,
            "data": str(data_path), "data_hash": data_hash,
            "objectives": ",".join(f"{o.metric}:{o.mode}" for o in spec.objectives),
            **{f"resources.{k}": v for k, v in spec.resources.items()},
        }, {"calotune.data_hash": data_hash})
        if args.resume:
            log.info("resuming %s: %d interrupted trial run(s) will be continued", run_name,
                     tracker.mark_interrupted())
        if isinstance(storage, Path):
            storage.mkdir(parents=True, exist_ok=True)
        latest_file.parent.mkdir(parents=True, exist_ok=True)
        latest_file.write_text(run_name)

        ctx = TrialContext(
            family=spec.family, detector=spec.detector, geometry=detector.geometry_dict(),
            objectives=tuple((o.metric, o.mode) for o in spec.objectives),
            max_epochs=spec.max_epochs, seed=args.seed, fixed=spec.fixed,
        )
        # Put once, read by every trial on every node; the held-out split never leaves the driver.
        data_ref = ray.put(dataclasses.replace(splits, test=splits.test.subset(slice(0, 0))))
        callback = MlflowTrialCallback(uri, experiment, run_name, str(home / "artifacts"),
                                       spec.max_epochs)
        res = spec.resources
        total_cpu = ray.cluster_resources().get("CPU", 1)
        per_trial_cpu = res["cpus_per_trial"] * res["workers_per_trial"]
        limit = max(1, int(total_cpu // per_trial_cpu))
        if res["gpus_per_trial"] > 0:
            gpus = ray.cluster_resources().get("GPU", 0)
            limit = min(limit, max(1, int(gpus // (res["gpus_per_trial"] * res["workers_per_trial"]))))
        max_concurrent = min(res.get("max_concurrent_trials", limit), limit)
        tuner = make_tuner(
            spec=spec, ctx=ctx, data_ref=data_ref, baseline=baseline, storage_path=storage,
            run_name=run_name, seed=args.seed, trials=spec.trials, callback=callback,
            max_concurrent=max_concurrent, resources=res, restore=args.resume,
        )
        t_search = time.perf_counter()
        result_grid = tuner.fit()
        search_s = time.perf_counter() - t_search
        outcomes = _outcomes(result_grid)
        return _finish(spec, splits, outcomes, tracker, baseline, run_name, data_hash, args,
                       uri, search_s, time.perf_counter() - t_start)
    except BaseException:
        if "tracker" in locals() and tracker.parent_run_id:
            tracker.end_search("KILLED")
        raise
    finally:
        ray.shutdown()


def _finish(spec, splits, outcomes, tracker, baseline, run_name, data_hash, args, uri,
            search_s, total_s) -> int:
    from calotune.sampling import score_model
    from calotune.tracking.mlflow_tracker import user
    from calotune.tuning.runner import is_baseline
    from calotune.tuning.worker import BEST_DIR

    metric, mode = spec.objective.metric, spec.objective.mode
    sign = 1.0 if mode == "min" else -1.0
    ok = [o for o in outcomes if o.error is None and o.checkpoint is not None
          and math.isfinite(float(o.metrics.get(metric, math.nan)))]
    failed = [o for o in outcomes if o.error is not None]
    lost = tracker.close_lost({o.trial_id for o in outcomes})
    if lost:
        log.warning("%d trial run(s) were unknown to the restored search (killed before Tune's last "
                    "snapshot), marked interrupted or orphaned: %s", len(lost), ", ".join(lost))
    runs = tracker.refresh()
    if not ok:
        reasons = "; ".join(f"{o.trial_id}: {o.error}" for o in failed[:5]) or "no trial reported"
        tracker.end_search("FAILED")
        log.error("all %d trials failed: %s", len(outcomes), reasons)
        return 1
    ranked = sorted(ok, key=lambda o: sign * float(o.metrics[metric]))
    best = ranked[0]
    front: list[TrialOutcome] = []
    if len(spec.objectives) > 1:
        from calotune.tuning.pareto import pareto_front, select

        names = [o.metric for o in spec.objectives]
        modes = [o.mode for o in spec.objectives]
        points = [[float(t.metrics[n]) for n in names] for t in ok]
        front = [ok[i] for i in pareto_front(points, modes)]
        best = ok[select(points, modes, names, spec.select)]
        ranked = [best, *[t for t in sorted(front, key=lambda o: sign * float(o.metrics[metric])) if t is not best]]
        _log_front(tracker, runs, front, best, names, spec.select)
    base = next((o for o in ok if is_baseline(o.config, baseline)), None)

    # Held-out test split: the search never saw it, so these numbers are honest.
    test_best, gen_best = score_model(best.checkpoint / BEST_DIR, splits.test, args.seed)
    generated = {best.trial_id: gen_best}
    test_base = None
    if base is not None:
        test_base, generated[base.trial_id] = score_model(base.checkpoint / BEST_DIR, splits.test, args.seed)
    for outcome, scores in ((best, test_best), (base, test_base)):
        if outcome is not None and scores is not None and outcome.trial_id in runs:
            tracker.log_metrics(runs[outcome.trial_id], {f"test_{k}": v for k, v in scores.items()})

    # Plots for the best few trials: generated vs reference on the held-out split.
    from calotune.detectors import get_detector

    detector = get_detector(spec.detector, **spec.geometry)
    with tempfile.TemporaryDirectory(prefix="calotune-plots-") as tmp:
        for outcome in ranked[:3]:
            if outcome.trial_id not in runs:
                continue
            gen = generated.get(outcome.trial_id)
            if gen is None:
                gen = score_model(outcome.checkpoint / BEST_DIR, splits.test, args.seed)[1]
            out = Path(tmp) / outcome.trial_id
            detector.plot(splits.test, gen, out)
            tracker.log_artifacts(runs[outcome.trial_id], out, "plots")

    best_run = runs.get(best.trial_id)
    version = None
    if best_run is not None:
        tracker.log_artifacts(best_run, best.checkpoint / BEST_DIR, "model")
        version = tracker.register(best_run, "model", spec.detector, "candidate", {
            "search": run_name, "trial": best.trial_id, "score": f"{test_best[metric]:.6g}",
            "objective": metric, "mode": spec.objective.mode, "data_hash": data_hash,
            "data_path": str(args.data_path), "split_seed": args.seed, "user": user(),
            "validation_fraction": spec.data.get("validation_fraction", 0.15),
            "test_fraction": spec.data.get("test_fraction", 0.15),
            "baseline_score": f"{test_base[metric]:.6g}" if test_base else "n/a",
        })
    summary = {
        "search_wall_s": search_s, "total_wall_s": total_s, "n_trials": len(outcomes),
        "n_failed": len(failed), f"best_validation_{metric}": float(best.metrics[metric]),
        f"best_test_{metric}": test_best[metric],
    }
    if test_base:
        summary[f"default_test_{metric}"] = test_base[metric]
    tracker.end_search("FINISHED", summary)
    _print_summary(spec, best, base, test_best, test_base, version, uri, args, summary, outcomes)
    return 0


def _log_front(tracker, runs, front, chosen, names, rule) -> None:
    """The Pareto front as a JSON artifact of the search run, and a tag on every trial run."""
    rows = [{"trial": t.trial_id, "chosen": t is chosen, **{n: float(t.metrics[n]) for n in names},
             "params": t.config} for t in front]
    on_front = {t.trial_id for t in front}
    for trial_id, run_id in runs.items():
        tracker.set_tags(run_id, {"calotune.pareto": str(trial_id in on_front).lower()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pareto_front.json"
        path.write_text(json.dumps({"objectives": names, "select": rule, "front": rows}, indent=2))
        tracker.log_artifacts(tracker.parent_run_id, Path(tmp))
    tracker.log_metrics(tracker.parent_run_id, {"pareto_front_size": len(front)})
    log.info("Pareto front (%s), %d trials:\n%s", " vs ".join(names), len(front), "\n".join(
        f"    {'*' if r['chosen'] else ' '} {r['trial']}  " + "  ".join(f"{n}={r[n]:.4g}" for n in names)
        for r in rows))


def _print_summary(spec, best, base, test_best, test_base, version, uri, args, summary, outcomes):
    from calotune.tuning.runner import result_state

    metric = spec.objective.metric
    states: dict[str, int] = {}
    for o in outcomes:
        state = "failed" if o.error else result_state(o.metrics, spec.max_epochs)[0]
        states[state] = states.get(state, 0) + 1
    lines = [
        "",
        f"== calotune search {spec.name}: {len(outcomes)} trials "
        f"({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}) in {summary['search_wall_s']:.0f} s ==",
        f"best trial {best.trial_id} ({best.epochs} epochs), parameters:",
        *[f"    {k} = {v}" for k, v in sorted(best.config.items())],
        f"held-out test {metric} ({spec.objective.mode}): best {test_best[metric]:.4f}"
        + (f"   default configuration {test_base[metric]:.4f}" if test_base else
           "   (default configuration trial did not finish)"),
    ]
    if version:
        lines.append(f"registered model {spec.detector!r} version {version}, alias 'candidate'; "
                     f"promote with: python -m calotune.promote {spec.detector}")
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite")
          else f"open {uri} in a browser")
    lines.append(f"compare runs: {ui}   (experiment {spec.name!r})")
    log.info("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
