"""A hyperparameter search as library functions: plan it, run it, get an exit status.

``python -m calotune.search`` is a thin command line over these; a notebook or a test can
call them directly::

    from calotune.tuning.orchestrate import SearchRequest, search
    status = search(SearchRequest(space="zdc_swiglu_tiny", trials=4, home=Path("/tmp/h")))

:func:`plan_search` checks every input (the space, the data, the tracking URI, the cluster
address, the resume record) before anything is written or started, so bad input leaves no
half-made MLflow runs or result folders behind; :func:`run_search` then runs Ray Tune,
scores the best and the default configuration on the held-out split, registers the best
model and keeps an honest record through interrupts (see :mod:`calotune.tuning.lifecycle`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calotune.errors import UserError

log = logging.getLogger("calotune.search")

#: ``--resume`` without a name: the latest search of the space under --home.
LATEST = "latest"


@dataclass
class SearchRequest:
    """What a user asks for: the search command's flags, as data (None: the default)."""

    space: str
    trials: int | None = None
    max_epochs: int | None = None
    data: Path | None = None
    events: int | None = None
    tracking_uri: str | None = None
    storage_path: str | None = None
    address: str | None = None
    seed: int | None = None
    resume: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    workers_per_trial: int | None = None
    max_concurrent: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    study_storage: str | None = None  # Optuna study database (calotune.tuning.studies); None: optuna.db beside MLflow
    home: Path = Path(".calotune")
    warm_start: str | None = None  # calotune.tuning.warmstart: "auto", a search name, models:/...


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: Path | None
    error: str | None
    epochs: int


#: MLflow parameter of a search run: the registered parent (NAME/VERSION) it started from.
PARENT_PARAM = "parent_model"


@dataclass
class Plan:
    """Everything a search needs, validated before anything is written or started."""

    spec: Any
    detector: Any
    showers: Any
    data_path: Path
    data_hash: str
    uri: str
    storage: Path | str
    home: Path
    name: str
    seed: int
    resume: bool
    record: dict[str, str]
    address: str | None = None
    parent: Any = None  # lineage.ParentModel of a search on a registered model
    study_storage: str | None = None  # the Optuna study's database URI (calotune.tuning.studies)
    warm: Any = None  # warmstart.WarmStart of a new warm-started search (a resume keeps Tune's study)


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be > 0, but got {value}")


def _folder(flag: str, path: Path) -> Path:
    """A folder calotune may create and write in; UserError if it is a file or read-only."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; pass a folder (it is created if missing)")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not a writable folder; pass a folder you can write to")
    return path


def _space_hash(spec) -> str:
    """What defines the searched space (not the budget): a resumed search must not change it."""
    keep = {k: getattr(spec, k) for k in ("family", "detector", "geometry", "data", "objectives",
                                          "select", "scheduler", "params", "fixed")}
    return hashlib.sha256(repr(sorted(keep.items())).encode()).hexdigest()[:16]


def _recorded_search(uri: str, experiment: str, name: str) -> tuple[dict[str, str], str, dict[str, str]]:
    """(params, status, tags) of search ``name``'s MLflow parent run; UserError if absent."""
    from calotune.tracking.mlflow_tracker import _client, search_runs_named

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else search_runs_named(client, exp.experiment_id, name)
    if not runs:
        raise UserError(f"--resume {name}: no search of that name in {uri} (experiment {experiment!r}); "
                        f"pass --tracking-uri/--home of the store it logged to, or start a new search")
    run = runs[0]
    return dict(run.data.params), run.info.status, dict(run.data.tags)


def plan_search(args: SearchRequest) -> Plan:
    """Validate every input and settle what the search will be; writes nothing to MLflow
    or Ray (the synthetic-data cache under --home is the only thing it may create)."""
    from calotune.detectors import get_detector
    from calotune.spec import ResourceSpec, check_resources, load_spec
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri
    from calotune.tuning import lifecycle
    from calotune.tuning.worker import FAULT_ENV, parse_fault

    for flag in ("trials", "max_epochs", "events", "workers_per_trial", "max_concurrent"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.cpus_per_trial is not None and not args.cpus_per_trial > 0:
        raise UserError(f"--cpus-per-trial must be > 0, but got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and not args.gpus_per_trial >= 0:
        raise UserError(f"--gpus-per-trial must be >= 0, but got {args.gpus_per_trial}")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be >= 0, but got {args.seed}")
    spec = load_spec(args.space)
    parse_fault(os.environ.get(FAULT_ENV))  # a malformed fault spec fails here, not in every trial
    _check_progress_env()
    home = _folder("--home", args.home)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:  # unreachable: refused now, not after minutes of ray.init retries
        _check_address(address, "--address" if args.address else "RAY_ADDRESS")
    uri = resolve_tracking_uri(args.tracking_uri, home, must_exist=args.resume is not None)
    if args.warm_start is not None and args.resume is None:
        try:  # a warm start reads the store, which must exist: opening a missing one creates it
            resolve_tracking_uri(args.tracking_uri, home, must_exist=True)
        except UserError as exc:
            raise UserError(f"--warm-start {args.warm_start}: {exc}") from None
    if args.storage_path and "://" in args.storage_path:
        storage: Path | str = args.storage_path  # an object store Ray Tune writes through pyarrow
    else:
        storage = _folder("--storage-path", Path(args.storage_path or home / "ray_results"))
    overrides = {k: v for k, v in {
        "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
        "workers_per_trial": args.workers_per_trial, "max_concurrent_trials": args.max_concurrent,
    }.items() if v is not None}
    check_resources(overrides, "command line (--cpus-per-trial/--gpus-per-trial/...)")

    record: dict[str, str] = {}
    data_flag = args.data
    if args.resume is not None:
        name = args.resume
        if name == LATEST:
            name = lifecycle.latest_search(home, spec.name)
            if name is None:
                raise UserError(f"--resume: no search of {spec.name!r} to resume under "
                                f"{lifecycle.searches_dir(home)}; run without --resume to start one")
        lifecycle.check_search_name(name)
        record, status, tags = _recorded_search(uri, spec.name, name)
        state = tags.get("calotune.state", "finished" if status == "FINISHED" else "")
        if state in {"finished", "failed"} or status == "FINISHED":
            raise UserError(f"--resume {name}: that search already {state or 'finished'}; nothing to "
                            f"resume (start a new search without --resume)")
        if record.get("space_hash") and record["space_hash"] != _space_hash(spec):
            raise UserError(f"--resume {name}: {spec.source} changed since the search started; "
                            f"restore the file or start a new search")
        given = {"trials": args.trials, "max_epochs": args.max_epochs, "seed": args.seed,
                 "sampler": args.sampler, "scheduler": args.scheduler, "warm_start": args.warm_start,
                 **{f"resources.{k}": v for k, v in overrides.items()}}
        lifecycle.check_resume_flags(name, record, {k: v for k, v in given.items() if v is not None})
        if args.warm_start is not None and "warm_start" not in record:
            raise UserError(f"--warm-start {args.warm_start}: search {name!r} was started without a warm "
                            f"start, and a resumed search keeps its Optuna history; drop the flag, or start "
                            f"a new search with it")
        trials, max_epochs = int(record["trials"]), int(record["max_epochs"])
        seed = int(record["seed"])
        algorithms = {"sampler": record.get("sampler", spec.sampler.type),
                      "scheduler": record.get("scheduler", spec.scheduler.type)}
        resources = ResourceSpec(**{k.removeprefix("resources."): (float(v) if "." in v else int(v))
                                    for k, v in record.items() if k.startswith("resources.")})
        if data_flag is None and record.get("data"):
            data_flag = Path(record["data"])
            if not data_flag.is_file():
                raise UserError(f"--resume {name}: its data {data_flag} is gone; pass --data with the "
                                f"same file")
        from ray import tune

        experiment_dir = f"{str(storage).rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(experiment_dir):
            raise UserError(f"--resume {name}: no Ray Tune state at {experiment_dir}; pass the "
                            f"--storage-path the search used (nothing was changed)")
    else:
        name = lifecycle.new_search_name(spec.name)
        trials, max_epochs = args.trials or spec.trials, args.max_epochs or spec.max_epochs
        if spec.train_phases == () and max_epochs != 1:
            raise UserError(f"--max-epochs {max_epochs}: {spec.source} is a sampling-only search (base_model "
                            f"without train_phases): it trains nothing and scores each trial once; drop "
                            f"--max-epochs")
        seed = args.seed if args.seed is not None else 0
        resources = dataclasses.replace(spec.resources, **overrides)
        algorithms = {"sampler": args.sampler or spec.sampler.type,
                      "scheduler": args.scheduler or spec.scheduler.type}
    spec = _with_algorithms(spec, algorithms["sampler"], algorithms["scheduler"],
                            "--sampler" if args.sampler else "--scheduler" if args.scheduler else spec.source)
    spec = dataclasses.replace(spec, resources=resources, trials=trials, max_epochs=max_epochs)
    detector = get_detector(spec.detector, **spec.geometry)
    _check_phases(spec, detector, "--max-epochs" if args.max_epochs else f"{spec.source}: budget.max_epochs")
    _check_data_fractions(spec, args)
    from calotune.tuning import pbt  # population-based training: its rules once the flags are applied

    pbt.check_search(spec, detector, sampler_where="--sampler" if args.sampler else f"{spec.source}: sampler",
                     epochs_where="--max-epochs" if args.max_epochs else f"{spec.source}: budget.max_epochs",
                     warm_start=args.warm_start, scheduler_where="--scheduler pbt" if args.scheduler else None)
    if data_flag is not None:
        if not data_flag.is_file():
            raise UserError(f"--data {data_flag}: file does not exist")
        data_path = data_flag.resolve()
    else:
        from calotune.data.cache import cached_synthetic

        home.mkdir(parents=True, exist_ok=True)
        data_path = cached_synthetic(detector, args.events or spec.data.events, spec.data.seed,
                                     home / "data", **dict(spec.data.synthesis))
    showers = detector.read(data_path)  # validates keys, shapes, dtypes, values before any write
    from calotune.tracking.registry import file_hash

    data_hash = file_hash(data_path)
    if record.get("data_hash") and record["data_hash"] != data_hash:
        raise UserError(f"--data {data_path}: not the file search {name!r} started with (its content "
                        f"changed); resume with the original file or start a new search")
    _check_split_sizes(spec, len(showers), data_path, args)
    parent = None
    if spec.base_model is not None:
        from calotune.tuning import lineage

        # a resumed search keeps the version it started from, wherever the alias points now
        pinned = record.get(PARENT_PARAM)
        parent = lineage.load_parent(spec, detector, uri,
                                     f"models:/{pinned}" if pinned else None)
        lineage.check_parent_data(parent, data_hash, seed, spec)
    warm = None
    if args.warm_start is not None and args.resume is None:
        from calotune.tuning import warmstart

        warm = warmstart.plan_warm_start(args.warm_start, spec, detector, uri, baseline_config(spec, parent))
    study_storage = _study_storage(args, home, uri)
    if spec.scheduler.type == "pbt":  # no Optuna study behind a PBT population (calotune.tuning.pbt)
        pbt.without_study(study_storage, args.study_storage)
        study_storage = None
    return Plan(spec=spec, detector=detector, showers=showers, data_path=data_path, data_hash=data_hash,
                uri=uri, storage=storage, home=home, name=name, seed=seed,
                resume=args.resume is not None, record=record, address=args.address, parent=parent,
                warm=warm, study_storage=study_storage)


def baseline_config(spec, parent=None) -> dict[str, Any]:
    """The baseline trial: the default configuration as a point of the space (the trainer's
    and the family's defaults, the parent's values on a registered model, the space's
    ``default`` and ``fixed``)."""
    from calotune.models.registry import config_fields
    from calotune.spec import TrainerConfig

    model_defaults = {name: f.default for name, f in config_fields(spec.family).items()
                      if f.default is not dataclasses.MISSING}
    # the trainer's own defaults too: a searched batch_size's baseline is TrainerConfig's, not
    # the first listed choice
    model_defaults.update(dataclasses.asdict(TrainerConfig()))
    if parent is not None:  # the baseline of a search on a registered model is that model
        model_defaults.update(parent.params)
    return spec.defaults({**model_defaults, **spec.fixed})


def _with_algorithms(spec, sampler: str, scheduler: str, where: str):
    """The spec with the sampler and scheduler a flag (or the resumed record) chose, checked."""
    from calotune.tuning import algorithms

    n = len(spec.objectives)
    if sampler != spec.sampler.type:
        algorithms.check_sampler(sampler, n, spec.params, where)
        # the space's options belong to its own sampler; a start-up count carries over where
        # the new sampler has one
        startup = spec.sampler.n_startup_trials if sampler in algorithms.STARTUP_SAMPLERS else None
        spec = dataclasses.replace(spec, sampler=dataclasses.replace(spec.sampler, type=sampler,
                                                                     multivariate=False,
                                                                     n_startup_trials=startup))
    if scheduler != spec.scheduler.type:
        algorithms.check_scheduler(scheduler, n, where)
        spec = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, type=scheduler))
    return spec


def _check_data_fractions(spec, args: SearchRequest) -> None:
    """``scheduler.data_fractions`` against the final scheduler and epoch budget (the flags
    --scheduler and --max-epochs may have changed both since the space was loaded)."""
    from calotune.tuning.algorithms import check_data_fractions

    s = spec.scheduler
    if s.data_fractions:
        flags = ", ".join(f for f, v in (("--scheduler", args.scheduler), ("--max-epochs", args.max_epochs)) if v)
        check_data_fractions(s.data_fractions, s.type, s.grace_period, s.reduction_factor, spec.max_epochs,
                             f"{spec.source}: scheduler.data_fractions" + (f" (with {flags})" if flags else ""))


def _check_phases(spec, detector, where: str) -> None:
    """The family's phases must fit the epoch budget (each needs one epoch), or every trial
    would fail after Ray started; checked on a model built on the meta device (no memory)."""
    import torch

    from calotune.models.registry import build_model, config_fields
    from calotune.tuning.worker import phase_schedule

    if spec.train_phases == ():
        return  # sampling-only: one round, no phases
    defaults = {name: f.default for name, f in config_fields(spec.family).items()
                if f.default is not dataclasses.MISSING}
    params = {**spec.defaults(defaults), **spec.fixed}
    model_params = {k: v for k, v in params.items() if k in config_fields(spec.family)}
    with torch.device("meta"):
        phases = build_model(spec.family, model_params, detector).phases()
    try:
        phase_schedule(phases, spec.train_phases, spec.max_epochs)
    except ValueError as exc:
        trained = [p.name for p in phases if spec.train_phases is None or p.name in spec.train_phases]
        raise UserError(f"{where} {spec.max_epochs}: family {spec.family!r} trains in phases "
                        f"{trained}: {exc}") from None


def _check_split_sizes(spec, n: int, data_path: Path, args: SearchRequest) -> None:
    """Every split must hold enough events to train on and to score with."""
    from calotune.spec import check_split_events

    if args.data is not None:
        where, key = f"--data {data_path}", "events in the file"
    elif args.events is not None:
        where, key = "--events", str(n)
    else:
        where, key = spec.source, "data.events"
    check_split_events(n, spec.data.validation_fraction, spec.data.test_fraction, where, key)


def _check_address(address: str, flag: str) -> None:
    """Refuse an unreachable cluster address at once (``ray.init`` would retry for minutes)."""
    import socket

    if address in {"auto", "local"}:
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{flag} {address}: expected HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"{flag} {address}: cannot reach {host}:{port} ({exc.strerror or exc}); "
                        f"check that the Ray head is running and the address is right") from None


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune's warning about frequent experiment snapshots (every 2 s, below) is expected.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's default loggers write every result again as result.json, progress.csv and a
    # TensorBoard file per trial: 45 ms per trial of the driver loop's time, for records
    # that MLflow already holds and nothing in calotune reads.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Snapshot Tune's experiment state every 2 s (the default is >= 10 s): a killed driver
    # then forgets at most the trials of its last 2 s. A snapshot takes milliseconds here.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # A failed trial's last result deliberately carries no score (see worker.train).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    quiet = not logging.getLogger("calotune").isEnabledFor(logging.DEBUG)
    if quiet:
        # Tune's own "Resume experiment with: Tuner.restore(...)" and "Trials did not complete"
        # lines name APIs a calotune user never calls; calotune reports both in its own words.
        logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
        # Tune's start banner (its searcher and scheduler class names, a TensorBoard
        # command): the legacy reporter at verbose=0 prints nothing; progress is calotune's.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray's start-up lines (the local instance, the token-auth notice) only with -v.
    level = logging.ERROR if quiet else logging.INFO
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    from calotune.tuning.worker import FAULT_ENV

    # A chaos test set on the driver reaches every trial, on whichever node it runs
    # (a cluster's workers inherit their node's environment, not the driver's).
    fault = os.environ.get(FAULT_ENV)
    extra = {"runtime_env": {"env_vars": {FAULT_ENV: fault}}} if fault else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level, **extra)
        else:  # "local": never join a cluster some other process happened to start here
            ray.init(address="local", include_dashboard=False, logging_level=level,
                     log_to_driver=os.environ.get("CALOTUNE_RAY_LOGS") == "1", **extra)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if address:
            raise UserError(f"{flag} {address}: cannot connect to the Ray cluster ({exc})") from None
        raise _local_ray_failed(exc) from None
    except Exception as exc:  # Ray raises a bare Exception when its node does not come up in time
        if address:
            raise UserError(f"{flag} {address}: cannot connect to the Ray cluster ({_first_line(exc)})") from None
        raise _local_ray_failed(exc) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _local_ray_failed(exc: BaseException):
    from calotune.errors import ServiceError

    return ServiceError(f"could not start a local Ray ({_first_line(exc)}); nothing was recorded. On an "
                        f"overloaded machine Ray's processes can miss their start-up deadline: retry when "
                        f"it is less busy, or start Ray yourself (ray start --head) and pass --address")


def _check_resources(spec) -> None:
    """Refuse a trial shape that no node of the cluster can ever hold (Tune would wait forever)."""
    import ray

    res = spec.resources
    cpu, gpu, workers = float(res.cpus_per_trial), float(res.gpus_per_trial), int(res.workers_per_trial)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]

    def slots(node: dict[str, float]) -> int:
        fits = [math.floor(node.get("CPU", 0) / cpu + 1e-9)]
        if gpu > 0:
            fits.append(math.floor(node.get("GPU", 0) / gpu + 1e-9))
        return min(fits)

    if sum(slots(n) for n in nodes) >= workers:
        return
    have = "; ".join(f"node {i}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes))
    want = f"{workers} worker(s) x ({cpu:g} CPU" + (f", {gpu:g} GPU)" if gpu else ")")
    raise UserError(f"resources: a trial needs {want}, but the Ray cluster has {have or 'no nodes'}; lower "
                    f"--cpus-per-trial/--gpus-per-trial/--workers-per-trial (or resources in {spec.source}) "
                    f"or add nodes")


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


def trial_context(spec, detector, seed: int, parent=None):
    """The one mapping from a search spec to what every trial's worker needs.

    A search on a registered ``parent`` builds every trial on the parent's parameters,
    overridden by the space's fixed and sampled ones.
    """
    from calotune.tuning.algorithms import epoch_fractions
    from calotune.tuning.checkpointing import DEFAULT_EVERY_S, decision_epochs
    from calotune.tuning.worker import TrialContext

    sched = spec.scheduler
    every_s = spec.resources.checkpoint_every_s
    return TrialContext(
        family=spec.family, detector=spec.detector, geometry=detector.geometry_dict(),
        objectives=tuple((o.metric, o.mode) for o in spec.objectives),
        max_epochs=spec.max_epochs, seed=seed,
        fixed={**(parent.params if parent else {}), **spec.fixed},
        train_phases=spec.train_phases, parent=parent.label if parent else None,
        validation_events=spec.data.validation_events,
        data_fractions=epoch_fractions(spec.scheduler.data_fractions, spec.scheduler.grace_period,
                                       spec.scheduler.reduction_factor, spec.max_epochs),
        checkpoint_epochs=decision_epochs(sched.type, spec.max_epochs, grace_period=sched.grace_period,
                                          reduction_factor=sched.reduction_factor,
                                          perturbation_interval=sched.perturbation_interval),
        checkpoint_every_s=DEFAULT_EVERY_S if every_s is None else float(every_s),
    )


def search(request: SearchRequest) -> int:
    """Plan and run a search; the command's exit status (0, 1 all trials failed, 130 interrupted).

    UserError for bad input, raised before anything is written.
    """
    t_start = time.perf_counter()
    return run_search(plan_search(request), t_start)


def run_search(plan: Plan, t_start: float | None = None) -> int:
    """Run a planned search under its lock (a second driver of the same search is refused)."""
    from calotune.tuning import lifecycle

    with lifecycle.search_lock(plan.home, plan.name):
        return _search(plan, time.perf_counter() if t_start is None else t_start)


class _Interrupted(Exception):
    """SIGINT/SIGTERM arrived: stop before anything else is recorded as a result."""


def _search(plan: Plan, t_start: float) -> int:
    import ray

    from calotune.data.splits import Splits, detach, empty_like, split
    from calotune.tracking.mlflow_tracker import Tracker
    from calotune.tuning import lifecycle, warmstart
    from calotune.tuning.lineage import PARENT_TAG
    from calotune.tuning.runner import MlflowTrialCallback, make_tuner

    spec, run_name, home = plan.spec, plan.name, plan.home
    experiment = spec.name
    # in place: the read arrays are reordered into [train | validation | test] and the
    # splits are views of them, so the driver holds one copy of the sample, not two
    splits = split(plan.showers, spec.data.validation_fraction, spec.data.test_fraction, seed=plan.seed,
                   in_place=True)
    plan.showers = None
    baseline = baseline_config(spec, plan.parent)
    lineage_tags = {PARENT_TAG: plan.parent.label} if plan.parent is not None else {}
    log.info("search %s: %s on %s, %d trials x %d epochs; data %s (%d train / %d validation / "
             "%d test events)", run_name, spec.family, spec.detector, spec.trials, spec.max_epochs,
             plan.data_path, len(splits.train), len(splits.validation), len(splits.test))

    clock = {"start": t_start}  # where a search's fixed cost goes, recorded in its summary
    t_ray = time.perf_counter()
    _init_ray(plan.address)
    clock["ray_init_s"] = time.perf_counter() - t_ray
    tracker = None
    callback = None
    stopper: threading.Thread | None = None
    try:
        _check_resources(spec)
        tracker = Tracker(plan.uri, experiment, home / "artifacts")
        record = lifecycle.budget_record(
            space_hash=_space_hash(spec), trials=spec.trials, max_epochs=spec.max_epochs, seed=plan.seed,
            data=str(plan.data_path), data_hash=plan.data_hash, resources=spec.resources.as_record(),
            sampler=spec.sampler.type, scheduler=spec.scheduler.type)
        warm_params, warm_tags = warmstart.record(plan.warm) if plan.warm is not None else ({}, {})
        # every search records its geometry's model name: a later warm start compares like with like
        warm_params[warmstart.MODEL_PARAM] = warmstart.model_name(spec, plan.detector)
        if plan.resume:
            tracker.attach_search(run_name, reopen=True)
            log.info("resuming %s: %d interrupted trial run(s) will be continued", run_name,
                     tracker.mark_interrupted())
        else:
            tracker.create_search(run_name, {
                "space": spec.source, "family": spec.family, "detector": spec.detector,
                "objectives": ",".join(f"{o.metric}:{o.mode}" for o in spec.objectives), **record,
                **({PARENT_PARAM: plan.parent.label} if plan.parent is not None else {}), **warm_params,
            }, {"calotune.data_hash": plan.data_hash, **lineage_tags, **warm_tags})
        tracker.set_tags(tracker.parent_run_id, {"calotune.state": "running"})
        _record_study(tracker, plan)
        if isinstance(plan.storage, Path):
            plan.storage.mkdir(parents=True, exist_ok=True)
        lifecycle.record_latest(home, spec.name, run_name)

        ctx = trial_context(spec, plan.detector, plan.seed, plan.parent)
        # Put once, read by every trial on every node; the held-out split never leaves the driver.
        data_ref = ray.put(dataclasses.replace(splits, test=empty_like(splits.test)))
        # From here the object store holds train and validation; the driver keeps only a copy
        # of the held-out split. Every view of the read arrays is dropped (an empty slice is a
        # view too, and would keep the whole sample alive), so their memory is freed.
        splits = Splits(train=empty_like(splits.train), validation=empty_like(splits.validation),
                        test=detach(splits.test))
        parent_ref = ray.put(plan.parent.files) if plan.parent is not None else None
        callback = MlflowTrialCallback(plan.uri, experiment, run_name, str(home / "artifacts"),
                                       spec.max_epochs, tuple(o.metric for o in spec.objectives),
                                       tags=lineage_tags, journal=_journal_path(plan))
        res = spec.resources
        total_cpu = ray.cluster_resources().get("CPU", 1)
        per_trial_cpu = res.cpus_per_trial * res.workers_per_trial
        limit = max(1, int(total_cpu // per_trial_cpu))
        if res.gpus_per_trial > 0:
            gpus = ray.cluster_resources().get("GPU", 0)
            limit = min(limit, max(1, int(gpus // (res.gpus_per_trial * res.workers_per_trial))))
        max_concurrent = min(res.max_concurrent_trials or limit, limit)
        with lifecycle.interruptible():
            tuner = make_tuner(
                spec=spec, ctx=ctx, data_ref=data_ref, parent_ref=parent_ref, baseline=baseline,
                storage_path=plan.storage,
                run_name=run_name, seed=plan.seed, trials=spec.trials, callback=callback,
                max_concurrent=max_concurrent, resources=res, restore=plan.resume, warm=plan.warm,
                study_storage=plan.study_storage,
            )
            t_search = clock["fit_start"] = time.perf_counter()
            result_grid = tuner.fit()
            callback.flush()  # every trial's record is in the store before it is read back
            search_s = time.perf_counter() - t_search
            if lifecycle.STOP.is_set():
                raise _Interrupted
            outcomes = _outcomes(result_grid)
            if callback.first_result_at is not None:
                clock["first_result"] = callback.first_result_at
            # Nothing below needs Ray: stopping the local instance (about 1.5 s, mostly
            # waiting for its processes to exit) overlaps the scoring and the plots.
            stopper = threading.Thread(target=lifecycle.shutdown_ray_keeping_handlers,
                                       name="calotune-ray-shutdown")
            stopper.start()
            return _finish(spec, splits, outcomes, tracker, baseline, run_name, plan, search_s, clock)
    except (_Interrupted, KeyboardInterrupt):
        _flush_quietly(callback)
        if tracker is not None and tracker.parent_run_id:
            _record_interrupt(tracker, run_name, spec, plan)
        return lifecycle.EXIT_INTERRUPTED
    except BaseException:
        _flush_quietly(callback)
        if tracker is not None and tracker.parent_run_id:
            tracker.set_tags(tracker.parent_run_id, {"calotune.state": "killed"})
            tracker.end_search("KILLED")
        raise
    finally:
        if stopper is not None:
            stopper.join()
        else:
            lifecycle.shutdown_ray_keeping_handlers()


def _journal_path(plan: Plan) -> str:
    """Where the trial records are journalled before they are queued for MLflow: beside the
    search's lock and latest-search pointer under ``--home`` (local even when Tune's storage
    is remote), so a ``--resume`` from the same home finds it."""
    return str(plan.home / "searches" / f"{plan.name}.journal.jsonl")


def _flush_quietly(callback) -> None:
    """Let the trial records queued so far reach the store before the search is closed; a
    write that failed is logged (by the writer) and must not hide the error being handled."""
    if callback is None:
        return
    try:
        callback.flush()
    except Exception as exc:
        log.warning("some trial records could not be written: %s", exc)


def _record_interrupt(tracker, run_name: str, spec, plan: Plan) -> None:
    """Close the record of an interrupted search honestly: running trials interrupted,
    the search KILLED with state "interrupted" (resumable), nothing registered."""
    from calotune.tuning import lifecycle

    by = lifecycle.received_signal() or "SIGINT"
    n = 0
    for trial_id, run_id in tracker.refresh().items():
        if tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.set_tags(run_id, {"calotune.interrupted": "true", "calotune.interrupted_by": by})
            tracker.end_trial(trial_id, "interrupted")
            n += 1
    tracker.set_tags(tracker.parent_run_id, {"calotune.state": "interrupted", "calotune.interrupted_by": by})
    tracker.end_search("KILLED")
    resume = f"python -m calotune.search {spec.source if '/' in spec.source else spec.name} --resume {run_name}"
    if plan.home != Path(".calotune").resolve():
        resume += f" --home {plan.home}"
    log.warning("search %s interrupted by %s: %d running trial(s) recorded as interrupted, nothing "
                "registered; continue it with: %s", run_name, by, n, resume)


def _finish(spec, splits, outcomes, tracker, baseline, run_name, plan: Plan, search_s: float,
            clock: dict[str, float]) -> int:
    """Score, plot, register and summarise a finished search; its exit status.

    ``clock``: perf_counter marks ``start`` and ``fit_start`` and ``ray_init_s``; the
    summary records the fixed cost around the trials (``setup_s`` before Tune starts,
    Ray's start-up apart, and ``finish_s`` after it) next to ``search_wall_s``.
    """
    from calotune.sampling import score_model_streamed
    from calotune.tracking.mlflow_tracker import user
    from calotune.tuning.lifecycle import STOP, uninterrupted
    from calotune.tuning.lineage import PARENT_TAG
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
        tracker.set_tags(tracker.parent_run_id, {"calotune.state": "failed"})
        tracker.end_search("FAILED")
        log.error("all %d trials failed: %s", len(outcomes), reasons)
        return 1
    best = min(ok, key=lambda o: sign * float(o.metrics[metric]))
    front: list[TrialOutcome] = []
    if len(spec.objectives) > 1:
        from calotune.tuning.pareto import pareto_front, select

        names = [o.metric for o in spec.objectives]
        modes = [o.mode for o in spec.objectives]
        points = [[float(t.metrics[n]) for n in names] for t in ok]
        front = [ok[i] for i in pareto_front(points, modes)]
        best = ok[select(points, modes, names, spec.select)]
        _log_front(tracker, runs, front, best, names, spec.select)
    base = next((o for o in ok if is_baseline(o.config, baseline)), None)

    # Held-out test split: the search never saw it, so these numbers are honest. Streamed:
    # each generated batch is reduced to per-event summaries at once (the generated samples
    # are never held), and the reference is summarised once for both models and the plots.
    ref_summary = plan.detector.summarise(splits.test)
    test_best, gen_best = score_model_streamed(best.checkpoint / BEST_DIR, splits.test, plan.seed,
                                               reference_summary=ref_summary)
    generated = {best.trial_id: gen_best}
    test_base = None
    if base is not None:
        test_base, generated[base.trial_id] = score_model_streamed(
            base.checkpoint / BEST_DIR, splits.test, plan.seed, reference_summary=ref_summary)
    ref_summary = ref_summary.for_plots()  # the cell-sized score inputs are no longer needed
    for outcome, scores in ((best, test_best), (base, test_base)):
        if outcome is not None and scores is not None and outcome.trial_id in runs:
            tracker.log_metrics(runs[outcome.trial_id], {f"test_{k}": v for k, v in scores.items()})

    # Plots of the best and the default trial, generated vs reference on the held-out split,
    # from the summaries of the samples just scored: generating more only for plots costs as
    # much as the scoring again, which for a diffusion family is minutes per trial.
    detector = plan.detector
    with tempfile.TemporaryDirectory(prefix="calotune-plots-") as tmp:
        for outcome in (best, base):
            if outcome is None or outcome.trial_id not in runs:
                continue
            gen = generated[outcome.trial_id]
            out = Path(tmp) / outcome.trial_id
            detector.plot(ref_summary, gen, out)
            tracker.log_artifacts(runs[outcome.trial_id], out, "plots")

    best_run = runs.get(best.trial_id)
    if best_run is not None:
        tracker.log_artifacts(best_run, best.checkpoint / BEST_DIR, "model")
    summary = {
        "search_wall_s": search_s, "n_trials": len(outcomes), "ray_init_s": clock["ray_init_s"],
        "setup_s": clock["fit_start"] - clock["start"] - clock["ray_init_s"],
        # from Tuner.fit to the first epoch reported: trial actors starting, imports, data
        **({"first_report_s": clock["first_result"] - clock["fit_start"]} if clock.get("first_result") else {}),
        "n_failed": len(failed), f"best_validation_{metric}": float(best.metrics[metric]),
        f"best_test_{metric}": test_best[metric],
        # the search's cost in trial-epoch-events: every event each trial trained on, per epoch
        "trial_epoch_events": sum(int(o.metrics.get("train_events_total", 0)) for o in outcomes),
    }
    if test_base:
        summary[f"default_test_{metric}"] = test_base[metric]
    if STOP.is_set():  # interrupted while scoring: the search did not finish, register nothing
        raise KeyboardInterrupt
    from calotune.detectors import get_detector
    from calotune.tracking.registry import registered_model_name

    version = None
    # One registered model per geometry: a shrunken test detector never competes with the
    # real one for production (their cells cannot be compared).
    model_name = registered_model_name(spec.detector, plan.detector.geometry_dict(),
                                       get_detector(spec.detector).geometry_dict())
    # A search on a registered model says whether it improved on it: the parent is the
    # baseline trial. The version is registered either way (the record of what was tried);
    # promotion, which compares candidate and production on held-out data, gates the rest.
    gain: dict[str, str] = {}
    if plan.parent is not None and test_base is not None:
        better = sign * test_best[metric] < sign * test_base[metric]
        gain = {"improves_on_parent": str(better).lower()}
        if not better:
            log.warning("no trial beat the parent %s on the held-out split (%s %.5g vs %.5g); the "
                        "candidate is tagged improves_on_parent=false", plan.parent.label, metric,
                        test_best[metric], test_base[metric])
    # Registration, the alias and the FINISHED record are one step: a signal waits for it.
    with uninterrupted():
        if best_run is not None:
            version = tracker.register(best_run, "model", model_name, "candidate", {
                "search": run_name, "trial": best.trial_id, "score": f"{test_best[metric]:.6g}",
                "objective": metric, "mode": spec.objective.mode, "data_hash": plan.data_hash,
                "data_path": str(plan.data_path), "split_seed": plan.seed, "user": user(),
                "validation_fraction": spec.data.validation_fraction,
                "test_fraction": spec.data.test_fraction,
                "baseline_score": f"{test_base[metric]:.6g}" if test_base else "n/a",
                **({PARENT_TAG: plan.parent.label, "train_phases": ",".join(spec.train_phases) or "none"}
                   if plan.parent is not None else {}), **gain,
            })
            tracker.set_tags(tracker.parent_run_id, {"calotune.registered": f"{model_name}/{version}"})
        summary.update(_log_search_summary(tracker, spec, plan, outcomes, runs, best, base, test_best,
                                           test_base, front, model_name, version))
        tracker.set_tags(tracker.parent_run_id, {"calotune.state": "finished"})
        now = time.perf_counter()
        summary["finish_s"] = now - clock["fit_start"] - search_s
        summary["total_wall_s"] = now - clock["start"]
        tracker.end_search("FINISHED", summary)
    _print_summary(spec, best, base, test_best, test_base, version, model_name, plan, summary, outcomes,
                   experiment_id=tracker.experiment_id)
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


def _print_summary(spec, best, base, test_best, test_base, version, model_name, plan, summary, outcomes,
                   experiment_id: str | None = None):
    from calotune.tuning.runner import result_state

    metric = spec.objective.metric
    states: dict[str, int] = {}
    for o in outcomes:
        state = "failed" if o.error else result_state(o.metrics, spec.max_epochs)[0]
        states[state] = states.get(state, 0) + 1
    lines = [
        "",
        f"== calotune search {plan.name}: {len(outcomes)} trials "
        f"({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}) in {summary['search_wall_s']:.0f} s, "
        f"{summary.get('trial_epoch_events', 0):,} trial-epoch-events ==",
        f"best trial {best.trial_id} ({best.epochs} epochs), parameters:",
        *[f"    {k} = {v}" for k, v in sorted(best.config.items())],
        f"held-out test {metric} ({spec.objective.mode}): best {test_best[metric]:.4f}"
        + (f"   default configuration {test_base[metric]:.4f}" if test_base else
           "   (default configuration trial did not finish)"),
    ]
    if version:
        lines.append(f"registered model {model_name!r} version {version}, alias 'candidate'; "
                     f"promote with: python -m calotune.promote {model_name}")
    uri = plan.uri
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite")
          else f"open {uri} in a browser")
    lines.append(f"compare runs: {ui}   (experiment {spec.name!r})")
    if experiment_id is not None:
        # MLflow 3.17's UI shows the GenAI view unless asked (a global switch, kept per browser)
        base_url = "http://127.0.0.1:5000" if uri.startswith("sqlite") else uri.rstrip("/")
        lines.append(f"  then open {base_url}/#/experiments/{experiment_id}?{MLFLOW_UI_QUERY}")
    if plan.study_storage is not None:
        from calotune.tuning.studies import dashboard_command

        lines.append(f"Optuna study {plan.name!r}: {dashboard_command(plan.study_storage)}")
    lines.append(f"search dashboard: {_dashboard_hint(plan)}")
    log.info("\n".join(lines))


# --- the Optuna study's storage, and the search run's summary --------------------------
#: Query of MLflow UI links: the "Model training" view (3.17 opens on GenAI otherwise).
MLFLOW_UI_QUERY = "workflowType=machine_learning"
#: Tags of the search run that say where its Optuna study is and how to open it.
TAG_STUDY, TAG_STUDY_STORAGE, TAG_OPTUNA_DASHBOARD = ("calotune.optuna_study", "calotune.optuna_storage",
                                                      "calotune.optuna_dashboard")


def _study_storage(args: SearchRequest, home: Path, uri: str) -> str | None:
    """The database of a new search's Optuna study, checked (nothing written); None on resume,
    whose searcher comes back from Ray Tune's snapshot with the study mirror it was made with."""
    from calotune.tuning import studies

    if args.resume is not None:
        if args.study_storage is not None:
            raise UserError("--study-storage: a resumed search keeps the Optuna study it started with "
                            "(Ray Tune restores its searcher); drop the flag, or start a new search")
        return None
    if args.study_storage is None:
        return studies.default_study_storage(home, uri)
    studies.check_study_storage(args.study_storage)
    return args.study_storage


def _record_study(tracker, plan: Plan) -> None:
    """Where the study is, as tags of the search run (a resumed search keeps its own)."""
    from calotune.tracking.mlflow_tracker import redact
    from calotune.tuning import studies

    if plan.study_storage is None:  # resumed: the hints name the storage it started with
        recorded = tracker.client.get_run(tracker.parent_run_id).data.tags.get(TAG_STUDY_STORAGE)
        plan.study_storage = recorded  # (redacted; the restored searcher holds the real URI)
        return
    tracker.set_tags(tracker.parent_run_id, {
        TAG_STUDY: plan.name, TAG_STUDY_STORAGE: redact(plan.study_storage),
        TAG_OPTUNA_DASHBOARD: studies.dashboard_command(plan.study_storage)})


def _dashboard_hint(plan: Plan) -> str:
    """The command that opens calotune's own dashboard on this search's store."""
    if plan.uri == f"sqlite:///{(plan.home / 'mlflow.db').resolve()}":
        return f"python -m calotune.dashboard --home {plan.home}"
    from calotune.tracking.mlflow_tracker import redact

    return f"python -m calotune.dashboard --tracking-uri {redact(plan.uri)}"


def _log_search_summary(tracker, spec, plan: Plan, outcomes, runs: dict[str, str], best, base,
                        test_best: dict[str, float], test_base: dict[str, float] | None, front,
                        model_name: str, version: str | None) -> dict[str, float]:
    """The search run as the page to read first: the best trial, the baseline and the front
    as tags and metrics, and a Markdown description (MLflow shows it at the top of the run)
    with links to the trial runs, the registered version, the Optuna study and the dashboard.

    Returns the extra metrics for the search run (counts, every held-out score of both)."""
    import json as _json

    from calotune.tuning.runner import result_state

    states = {"complete": 0, "pruned": 0, "failed": 0}
    for o in outcomes:
        state = "failed" if o.error else result_state(o.metrics, spec.max_epochs)[0]
        states[state] = states.get(state, 0) + 1
    metrics: dict[str, float] = {f"n_{k}": float(v) for k, v in states.items()}
    metrics.update({f"best_test_{k}": v for k, v in test_best.items()})
    metrics.update({f"default_test_{k}": v for k, v in (test_base or {}).items()})
    exp = tracker.experiment_id

    def link(trial_id: str | None) -> str:
        if trial_id is None:
            return "n/a"
        run = runs.get(trial_id)
        return f"[{trial_id}](#/experiments/{exp}/runs/{run})" if run else trial_id

    tags: dict[str, str] = {
        "calotune.best_trial": best.trial_id, "calotune.best_run": runs.get(best.trial_id, ""),
        "calotune.best_params": _json.dumps(best.config, sort_keys=True, default=str)[:4900],
        "calotune.baseline_trial": base.trial_id if base is not None else "none",
        "calotune.dashboard": _dashboard_hint(plan),
    }
    if base is not None and base.trial_id in runs:
        tags["calotune.baseline_run"] = runs[base.trial_id]
    if front:
        tags["calotune.front"] = ",".join(t.trial_id for t in front)
    tracker.log_params(tracker.parent_run_id, {f"best.{k}": v for k, v in best.config.items()})
    metric, mode = spec.objective.metric, spec.objective.mode
    # the objectives and the generation time; every other score is a metric of the run
    # (best_test_* / default_test_*), and a long table would hide the links below it
    rows = [o.metric for o in spec.objectives] + (["gen_time_ms"] if "gen_time_ms" in test_best else [])
    rows = list(dict.fromkeys(rows))
    lines = [
        f"**{plan.name}**: {spec.family} on {spec.detector}, {len(outcomes)} trials "
        f"({', '.join(f'{v} {k}' for k, v in states.items())}), objective `{metric}` ({mode}).",
        "",
        f"Best trial {link(best.trial_id)} against the baseline (default configuration) "
        f"{link(base.trial_id if base is not None else None)}, on the held-out test split "
        "(which the search never saw):",
        "",
        "| score | best | baseline |",
        "|---|---|---|",
        *[f"| {'**' + k + '**' if k == metric else k} | {test_best.get(k, float('nan')):.5g} | "
          + (f"{test_base[k]:.5g}" if test_base and k in test_base else "n/a") + " |" for k in rows],
        "",
        "Every held-out score: metrics `best_test_*` and `default_test_*` of this run.",
        "",
        "Best parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(best.config.items())),
    ]
    if front:
        lines += ["", f"Pareto front ({len(front)} trials, artifact `pareto_front.json`): "
                  + ", ".join(link(t.trial_id) for t in front)]
    if version:
        lines += ["", f"Registered: model `{model_name}` version {version}, alias `candidate`. Promote with "
                  f"`python -m calotune.promote {model_name}`; the promotion writes a model card and links "
                  f"it from the version (tag `calotune.model_card`)."]
    if plan.study_storage is not None:
        from calotune.tuning.studies import dashboard_command

        lines += ["", f"Optuna study `{plan.name}`: `{dashboard_command(plan.study_storage)}`"]
    lines += ["", f"Dashboard: `{_dashboard_hint(plan)}`"]
    tags["mlflow.note.content"] = "\n".join(lines)
    tracker.set_tags(tracker.parent_run_id, tags)
    return metrics


def _check_progress_env() -> None:
    """A mistyped CALOTUNE_PROGRESS is refused before the search starts, naming the variable."""
    value = os.environ.get("CALOTUNE_PROGRESS")
    if value is not None and value.strip().lower() not in {"", "bar", "lines", "quiet"}:
        raise UserError(f"CALOTUNE_PROGRESS={value!r} (from the environment): must be bar, lines or quiet; "
                        f"fix or unset it")
