"""Ray Tune glue: the trial driver, the searcher, the scheduler and the MLflow callback.

Per-trial overhead is a design decision. A ``TorchTrainer`` per trial costs ~25 s of
start-up on a 2-core machine, so a one-worker trial runs the worker function in the Tune
trial's own (re-used) actor and reports through ``ray.tune.report``. A trial with
``workers_per_trial > 1`` builds a ``TorchTrainer`` whose workers run the very same
function under DDP (gloo on CPU, NCCL on GPU), reporting through Ray Train and
``TuneReportCallback``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from calotune.data.splits import Splits
from calotune.spec import ResourceSpec
from calotune.tracking.mlflow_tracker import Tracker
from calotune.tuning.lifecycle import STOP, InterruptCallback, received_signal
from calotune.tuning.worker import FAILED_KEY, PRUNED_KEY, TrialContext, train

log = logging.getLogger(__name__)

# --- the trial driver ------------------------------------------------------------------
def _reporter_tune(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def _reporter_train(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ddp_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: the shared training loop under a worker group."""
    import ray.train.torch

    data: Splits = ray.get(config["data_ref"][0])
    torch.set_num_threads(max(1, int(config["threads"])))
    resume = Path(config["resume"]) if config.get("resume") else None
    train(_context(config["ctx"]), config["params"], data, _reporter_train,
          device=ray.train.torch.get_device(), resume_dir=resume, parent=_parent(config["data_ref"]))


def _context(ctx: dict[str, Any]) -> TrialContext:
    """TrialContext from its dict form (tuples come back as lists through Ray)."""
    ctx = dict(ctx)
    for key in ("objectives", "train_phases"):
        if ctx.get(key) is not None:
            ctx[key] = tuple(tuple(x) if isinstance(x, list) else x for x in ctx[key])
    return TrialContext(**ctx)


def _parent(refs: list) -> Any:
    """The registered parent model of a search on one (the second object ref), or None."""
    if len(refs) < 2 or refs[1] is None:
        return None
    from calotune.tuning.lineage import materialise

    return materialise(ray.get(refs[1]))[0]


def trial_driver(config: dict[str, Any], data_ref: list, ctx: dict[str, Any],
                 resources: ResourceSpec, storage_path: str) -> None:
    """The Tune function trainable: one trial, in-process or as a DDP worker group."""
    params = dict(config)
    checkpoint = tune.get_checkpoint()
    workers = int(resources.workers_per_trial)
    threads = max(1, math.floor(resources.cpus_per_trial))
    if workers == 1:
        torch.set_num_threads(threads)
        data: Splits = ray.get(data_ref[0])
        context = _context(ctx)
        parent = _parent(data_ref)
        if checkpoint is not None:
            with checkpoint.as_directory() as resume:
                train(context, params, data, _reporter_tune, device=_device(), resume_dir=Path(resume),
                      parent=parent)
        else:
            train(context, params, data, _reporter_tune, device=_device(), parent=parent)
        return

    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resume = None
    if checkpoint is not None:
        resume = checkpoint.path
    use_gpu = resources.gpus_per_trial > 0
    per_worker = {"CPU": resources.cpus_per_trial}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_trial
    trainer = TorchTrainer(
        ddp_worker,
        train_loop_config={"params": params, "ctx": ctx, "data_ref": data_ref, "threads": threads,
                           "resume": resume},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=TrainRunConfig(
            name=f"{tune.get_context().get_trial_id()}-ddp", storage_path=storage_path,
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# --- searcher and scheduler ----------------------------------------------------------
class FailAwareOptunaSearch(OptunaSearch):
    """Tell Optuna FAIL for an errored trial, even if it reported results before failing.

    Ray's OptunaSearch marks a trial COMPLETE whenever its last result holds the metric,
    so a trial whose loss went NaN at epoch 5 would be scored with its epoch-4 value.

    A result without the objective (an epoch of an unscoreable phase, e.g. a VQ-VAE's
    autoencoder stage before its prior is trained) is no intermediate value: Optuna's
    pruner and TPE see scoreable epochs only. Ray's OptunaSearch would raise KeyError.

    ``warm_trials``: Optuna trials of earlier searches (:mod:`calotune.tuning.warmstart`),
    added to the study as soon as it exists, so that TPE models the space from the first
    trial it samples. Ray's ``evaluated_rewards`` cannot do this for a define-by-run space.
    """

    def __init__(self, *args: Any, warm_trials: list | None = None, study_mirror: Any = None,
                 **kwargs: Any) -> None:
        self._warm_trials = list(warm_trials or [])  # read by _setup_study, called by super()
        # studies.StudyMirror: each finished trial copied into a database study, for optuna-dashboard
        self._study_mirror = study_mirror
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        if getattr(self, "_warm_trials", None):
            self._ot_study.add_trials(self._warm_trials)
            self._warm_trials = []  # in the study now (and pickled with it): never added twice

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if FAILED_KEY not in result and (not isinstance(self.metric, str) or self.metric in result):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error and STOP.is_set():
            # A worker that died with the interrupted driver did not fail: leave the Optuna
            # trial open; the record says "interrupted" and the budget stays resumable.
            return
        error = error or bool(result and FAILED_KEY in result)
        if not error and result and (STOPPED_KEY in result or PRUNED_KEY in result):
            # Stopped at a rung or judged meaningless by its family: PRUNED in Optuna, as in
            # MLflow and the summary (Ray tells PRUNED for a trial that ends without a
            # value); its intermediate values still rank it for TPE, below finished trials.
            result = None
        super().on_trial_complete(trial_id, None if error else result, error)
        mirror = getattr(self, "_study_mirror", None)  # a searcher from an older snapshot has none
        if mirror is not None and trial_id in self._ot_trials:
            ot_trial = self._ot_trials[trial_id]
            mirror.add(trial_id, self._ot_study._storage.get_trial(ot_trial._trial_id))


class BaselineKeepingASHA(AsyncHyperBandScheduler):
    """ASHA that never stops the baseline (default-configuration) trial.

    The baseline's held-out score is what the best trial is compared against, so it must
    train for the full budget like the best one did.
    """

    def __init__(self, baseline: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._baseline = baseline
        #: trial id -> why it was stopped at a rung (read by :class:`StopReasonCallback`)
        self.stopped: dict[str, dict[str, Any]] = {}

    def on_trial_result(self, tune_controller, trial, result):  # type: ignore[override]
        """CONTINUE for a result without the metric (an unscoreable epoch): it is never
        recorded in a rung, so no trial is ranked or stopped on it. Ray 2.60's ASHA does
        the same (calotune runs Tune with TUNE_DISABLE_STRICT_METRIC_CHECKING=1, so such a
        result reaches it); the check is repeated here so that it does not hang on that."""
        if self.metric not in result:
            return TrialScheduler.CONTINUE
        judged = self._rung_of(trial.trial_id, result.get(self._time_attr))
        decision = super().on_trial_result(tune_controller, trial, result)
        if is_baseline(trial.config, self._baseline):
            return TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP and judged is not None and result[self._time_attr] < self._max_t:
            rung, epoch, cutoff, n = judged
            value = float(result[self.metric])
            if not hasattr(self, "stopped"):  # a scheduler pickled before stop reasons existed
                self.stopped = {}
            self.stopped[trial.trial_id] = {
                "rung": rung, "epoch": epoch, "at_rung": n + 1,
                "text": f"ASHA: below the top 1/{self._reduction_factor:g} at rung {rung} (epoch {epoch}): "
                        f"{self.metric} {value:.4g}, cutoff {self._metric_op * cutoff:.4g} over the {n} "
                        f"trial(s) there before it"}
        return decision

    def _rung_of(self, trial_id: str, t: Any) -> tuple[int, int, float, int] | None:
        """(rung index, its epoch, cutoff, trials recorded) of the rung a result at ``t`` is
        judged at, read before the result is recorded there (Ray's bracket logic)."""
        bracket = self._trial_info.get(trial_id)
        if bracket is None or t is None:
            return None
        rungs = bracket._rungs  # highest milestone first
        for i, (milestone, recorded) in enumerate(rungs):
            if t < milestone or trial_id in recorded:
                continue
            cutoff = bracket.cutoff(recorded)
            return (len(rungs) - 1 - i, int(milestone), float(cutoff), len(recorded)) if cutoff is not None else None
        return None


#: Result key of a trial a scheduler stopped at a rung; the value says why (MLflow tag
#: ``calotune.pruned_reason``). Beside it, numbers (so also MLflow metrics of the trial):
#: the rung (0 = the first, at grace_period epochs), its epoch, and for MO-ASHA how many
#: trials at the rung dominate the stopped one.
STOPPED_KEY = "calotune_stopped"


class StopReasonCallback(Callback):
    """Write why the scheduler stopped a trial into the result it stopped it on.

    Tune hands the scheduler a copy of each result, so the scheduler only keeps its reason
    (``scheduler.stopped``); Tune's callbacks then receive the result itself, which may be
    changed in place and becomes the trial's last result. Listed before every other
    callback, so the MLflow record, the progress log and the summary all see it.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def on_trial_result(self, iteration, trials, trial, result, **info):
        why = getattr(self.scheduler, "stopped", {}).get(trial.trial_id)
        if why is not None and STOPPED_KEY not in result:
            result[STOPPED_KEY] = why["text"]
            result["stopped_at_rung"] = why["rung"]
            result["stopped_at_epoch"] = why["epoch"]
            if "dominated_by" in why:
                result["stopped_dominated_by"] = why["dominated_by"]


def is_baseline(config: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """Whether a trial's sampled configuration is the default configuration."""
    return dict(config) == baseline


# --- MLflow callback -----------------------------------------------------------------
#: What Ray Tune adds to every result: bookkeeping, not physics, so not MLflow metrics (the
#: node is a tag; ``training_iteration``, the epochs done, stays: it is the trial's progress).
RAY_RESULT_KEYS = frozenset({
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "date", "done",
    "time_since_restore", "iterations_since_restore", "timesteps_since_restore", "timesteps_total",
    "episodes_total", "trial_id", "experiment_tag", "config", "should_checkpoint",
    "checkpoint_dir_name", "node_id",
})


#: Reported after every epoch of every trial: its history says which epochs a run recorded.
EPOCH_MARKER = "epoch_time_s"


class MlflowTrialCallback(Callback):
    """Mirror every trial into a nested MLflow run under the search's parent run.

    Runs in the driver only, so a SQLite store never sees concurrent writers. Picklable
    (Tune stores its callbacks with the experiment) by re-opening the tracker lazily.

    The writes happen on one background thread, in the order Tune's events arrived, so
    Tune's driver loop never waits on the store (0.2-0.3 s per trial with SQLite on a
    loaded 2-core machine). :meth:`flush` waits until every queued write is done and
    re-raises the first failure; Tune calls it at the end of the experiment
    (``on_experiment_end``) and the search calls it before it reads the trial runs back
    or records an interruption, so nothing queued is lost at a normal or signalled exit.

    The objectives (a trial's score) are held back while a trial runs and written once it
    ends complete or pruned: a trial that fails at epoch 2 must not keep its epoch-1 score.
    The per-epoch curve is logged as ``<objective>_epoch``.

    Each epoch is recorded once. A trial resumed from a checkpoint older than its last
    report (checkpoints are sparse, :mod:`calotune.tuning.checkpointing`) re-runs and
    re-reports the epochs in between, with the same numbers (the checkpoint restores the
    random streams); the first record of an epoch is kept and the repeat only counted in
    the tag ``calotune.epochs_rerun``.

    ``journal``: a file to which every epoch's record is appended (and flushed to the OS)
    before it is queued, so a driver killed with writes still queued loses none of them:
    the callback Tune restores on ``--resume`` first writes the journal's records that the
    store lacks.
    """

    def __init__(self, tracking_uri: str, experiment: str, search: str, artifact_root: str,
                 max_epochs: int, objectives: tuple[str, ...] = (), tags: dict[str, str] | None = None,
                 journal: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.journal = journal
        self._journal_file: Any = None
        self._replay = False  # set on a callback Tune restored (__setstate__)
        self.tags = dict(tags or {})  # on every trial run (the lineage of a search on a parent)
        self.experiment = experiment
        self.search = search
        self.artifact_root = artifact_root
        self.max_epochs = max_epochs
        self.objectives = tuple(objectives)
        self._tracker: Tracker | None = None
        self._nodes: dict[str, list[str]] = {}
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        self.first_result_at: float | None = None  # perf_counter of this driver's first report
        self._steps: dict[str, int] = {}  # trial -> last epoch recorded
        self._reruns: dict[str, int] = {}  # trial -> epochs reported again after a resume

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tracker"] = None
        state["_queue"] = None
        state["_error"] = None
        state["_steps"] = {}  # re-read from the store after a restore (_resume)
        state["first_result_at"] = None  # a perf_counter mark means nothing in another process
        state["_reruns"] = {}
        state["_journal_file"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._replay = bool(state.get("journal"))  # a restored driver: replay what a kill lost

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            tracker = Tracker(self.tracking_uri, self.experiment, Path(self.artifact_root))
            tracker.attach_search(self.search)
            self._tracker = tracker
        return self._tracker

    # ---- the writer thread ----------------------------------------------------------
    def _submit(self, write: Callable[[], None]) -> None:
        if getattr(self, "_queue", None) is None:
            self._queue = queue.Queue()
            self._error = None
            threading.Thread(target=self._drain, args=(self._queue,), name="calotune-mlflow",
                             daemon=True).start()
            if getattr(self, "_replay", False):
                self._replay = False
                self._queue.put(self._replay_journal)
        assert self._queue is not None
        self._queue.put(write)

    def _journal_write(self, record: dict[str, Any]) -> None:
        """Append one record to the journal; flushed, so it survives the process (not the host)."""
        if not getattr(self, "journal", None):
            return
        if getattr(self, "_journal_file", None) is None:
            Path(self.journal).parent.mkdir(parents=True, exist_ok=True)
            self._journal_file = open(self.journal, "a", encoding="utf-8")  # kept open: one line per epoch
        self._journal_file.write(json.dumps(record, default=str) + "\n")
        self._journal_file.flush()

    def _replay_journal(self) -> None:
        """Write the journal's epoch records that the store lacks (queued when a kill came)."""
        path = Path(self.journal)
        if not path.is_file():
            return
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed writer may be cut short
                continue
            by_trial.setdefault(record["trial"], []).append(record)
        written = 0
        for trial_id, records in by_trial.items():
            run_id = self.tracker.trial_run(trial_id, records[0]["config"])
            have = {m.step for m in self.tracker.client.get_metric_history(run_id, EPOCH_MARKER)}
            for record in records:
                if record["step"] not in have:
                    self.tracker.log_metrics(run_id, record["metrics"], step=record["step"])
                    have.add(record["step"])
                    written += 1
            steps = self.__dict__.setdefault("_steps", {})
            steps[trial_id] = max(have | {steps.get(trial_id, 0)})
        if written:
            log.info("%d epoch record(s) queued when the previous driver stopped were written from %s",
                     written, path)

    def _drain(self, writes: queue.Queue) -> None:
        while True:
            write = writes.get()
            try:
                if self._error is None:  # after a failure, later writes would only add noise
                    write()
            except BaseException as exc:  # re-raised in the driver by flush()
                self._error = exc
                log.error("MLflow write failed: %s", exc)
            finally:
                writes.task_done()

    def flush(self) -> None:
        """Wait for every queued write; raise the first one that failed."""
        if getattr(self, "_queue", None) is not None:
            self._queue.join()
        if getattr(self, "_error", None) is not None:
            raise self._error

    def on_experiment_end(self, trials, **info):
        self.flush()

    # ---- Tune's events -> queued writes ---------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._submit(lambda t=trial.trial_id, c=dict(trial.config): self._resume(t, c))

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._submit(lambda t=trial.trial_id, c=dict(trial.config): self._resume(t, c))

    def _resume(self, trial_id: str, config: dict[str, Any]) -> None:
        run_id = self.tracker.trial_run(trial_id, config)
        run = self.tracker.client.get_run(run_id)
        steps = self.__dict__.setdefault("_steps", {})
        if EPOCH_MARKER in run.data.metrics and trial_id not in steps:  # a run from before a restart
            history = self.tracker.client.get_metric_history(run_id, EPOCH_MARKER)
            steps[trial_id] = max((m.step for m in history), default=0)
        if run.info.status != "RUNNING" or run.data.tags.get("calotune.state") == "interrupted":
            self.tracker.client.update_run(run_id, status="RUNNING")
            self.tracker.set_tags(run_id, {"calotune.state": "running"})
        tags = getattr(self, "tags", {})  # a callback restored from an older snapshot has none
        if tags and any(run.data.tags.get(k) != v for k, v in tags.items()):
            self.tracker.set_tags(run_id, tags)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if getattr(self, "first_result_at", None) is None:  # the search's fixed cost ends here
            self.first_result_at = time.perf_counter()
        self._journal_write({"trial": trial.trial_id, "config": dict(trial.config),
                             "step": int(result.get("training_iteration", 0)), "metrics": self._epoch_metrics(result)})
        self._submit(lambda t=trial.trial_id, c=dict(trial.config), r=dict(result): self._result(t, c, r))

    def _epoch_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        """What an epoch's result records: numbers, not the objectives (held back to the end)."""
        return {k: v for k, v in result.items() if k not in self.objectives and k not in RAY_RESULT_KEYS
                and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}

    def _result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        run_id = self.tracker.trial_run(trial_id, config)
        step = int(result.get("training_iteration", 0))
        steps = self.__dict__.setdefault("_steps", {})
        if step <= steps.get(trial_id, 0):  # re-run after a resume from an older checkpoint
            reruns = self.__dict__.setdefault("_reruns", {})
            reruns[trial_id] = reruns.get(trial_id, 0) + 1
            self.tracker.set_tags(run_id, {"calotune.epochs_rerun": str(reruns[trial_id])})
            return
        steps[trial_id] = step
        self.tracker.log_metrics(run_id, self._epoch_metrics(result), step=step)
        node = result.get("node_id")
        if node and self._nodes.get(trial_id, [None])[-1] != node:
            # A retried trial may move to another node (a lost node): keep the history.
            nodes = [*self._nodes.get(trial_id, []), node]
            self._nodes[trial_id] = nodes
            self.tracker.set_tags(run_id, {"calotune.node_id": node, "calotune.nodes": ",".join(nodes),
                                           "calotune.hostname": result.get("hostname", "unknown")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        state, reason = trial_state(trial, self.max_epochs)
        last = dict(trial.last_result or {})
        self._submit(lambda t=trial.trial_id, c=dict(trial.config): self._complete(t, c, state, reason, last))

    def _complete(self, trial_id: str, config: dict[str, Any], state: str, reason: str | None,
                  last: dict[str, Any]) -> None:
        run_id = self.tracker.trial_run(trial_id, config)
        if state != "failed":
            self.tracker.log_metrics(run_id, {k: last[k] for k in self.objectives if k in last},
                                     step=int(last.get("training_iteration", 0)))
        self.tracker.end_trial(trial_id, state, reason=reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        interrupted = STOP.is_set()  # decided now: the flag may change before the write runs
        by = received_signal() or "signal"
        text = None if interrupted else error_text(trial)
        self._submit(lambda t=trial.trial_id, c=dict(trial.config): self._error_end(t, c, interrupted, by, text))

    def _error_end(self, trial_id: str, config: dict[str, Any], interrupted: bool, by: str,
                   text: str | None) -> None:
        run_id = self.tracker.trial_run(trial_id, config)
        if interrupted:  # died with the interrupted driver (e.g. SIGTERM to the whole job)
            self.tracker.set_tags(run_id, {"calotune.interrupted": "true", "calotune.interrupted_by": by})
            self.tracker.end_trial(trial_id, "interrupted")
            return
        self.tracker.end_trial(trial_id, "failed", reason=text)

    # ---- population-based training (calotune.tuning.pbt) --------------------------------
    def record_pbt(self, trial_id: str, config: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """A trial exploited another: queue the record of its PBT history (MLflow params stay
        the initial configuration; they cannot change)."""
        self._submit(lambda: self._pbt(trial_id, config, history))

    def _pbt(self, trial_id: str, config: dict[str, Any], history: list[dict[str, Any]]) -> None:
        import tempfile

        from calotune.tuning.pbt import METRIC_EXPLOITS, TAG_HISTORY, history_tags

        run_id = self.tracker.trial_run(trial_id, config)
        last = history[-1]
        with tempfile.TemporaryDirectory(prefix="calotune-pbt-") as tmp:
            # A resumed search starts Ray's PBT bookkeeping afresh (Ray does not checkpoint a
            # scheduler's state): the exploits recorded before the interruption are kept.
            key = lambda e: json.dumps(e, sort_keys=True, default=str)  # noqa: E731
            history = json.loads(json.dumps(history, default=str))
            if self.tracker.client.get_run(run_id).data.tags.get(TAG_HISTORY):
                earlier = json.loads(Path(self.tracker.client.download_artifacts(
                    run_id, "pbt/history.json", tmp)).read_text())
                seen = {key(e) for e in history}
                history = [e for e in earlier if key(e) not in seen] + history
            self.tracker.set_tags(run_id, history_tags(config, history))
            self.tracker.log_metrics(run_id, {METRIC_EXPLOITS: len(history)}, step=int(last["epoch"]))
            out = Path(tmp) / "out"
            out.mkdir()
            (out / "history.json").write_text(json.dumps(history, indent=1, default=str))
            self.tracker.log_artifacts(run_id, out, "pbt")
        # The trial continues from the copied checkpoint's epoch: its next epochs are new
        # training, not re-runs of epochs already recorded.
        steps = self.__dict__.setdefault("_steps", {})
        if trial_id in steps:
            steps[trial_id] = min(steps[trial_id], int(last["resumed_at_epoch"]))


class ProgressState:
    """What the progress view shows, from Tune's events alone (no terminal, no clock reads
    in the logic, so it is tested in-process with fake trials).

    Counts trials running / complete / pruned / failed, the best objective so far against
    the baseline (default-configuration) trial, and an estimate of the time left in the
    budget: the epochs still owed by running and unstarted trials, at the mean epoch time
    seen so far, spread over the concurrent trials. Pruning only ever shortens it, so it is
    an upper estimate ("~N min left"). A resumed search counts the trials Tune restored as
    finished (their results come with the trial list, not as new events).
    """

    def __init__(self, metric: str, mode: str, trials: int, max_epochs: int,
                 baseline: dict[str, Any] | None = None, concurrency: int = 1) -> None:
        self.metric, self.mode, self.trials, self.max_epochs = metric, mode, trials, max_epochs
        self.baseline = baseline
        self.concurrency = max(1, concurrency)
        self.states: dict[str, str] = {}  # trial id -> running / complete / pruned / failed
        self.epochs: dict[str, int] = {}
        self.best: float | None = None
        self.best_trial: str | None = None
        self.baseline_value: float | None = None
        self._epoch_s = 0.0
        self._epoch_n = 0

    # ---- inputs -------------------------------------------------------------------
    def seed(self, trials: list) -> None:
        """Take in trials this view has not seen: on a resumed search, those Tune restored."""
        for trial in trials:
            if trial.trial_id in self.states:
                continue
            status = getattr(trial, "status", "PENDING")
            last = dict(getattr(trial, "last_result", None) or {})
            if status == "TERMINATED":
                self.states[trial.trial_id] = result_state(last, self.max_epochs)[0]
            elif status == "ERROR":
                self.states[trial.trial_id] = "failed"
            elif status in {"RUNNING", "PAUSED"}:
                self.states[trial.trial_id] = "running"
            else:
                continue  # PENDING: not started, nothing to count yet
            self.epochs[trial.trial_id] = int(last.get("training_iteration", 0) or 0)
            if self.states[trial.trial_id] != "failed":
                self._value(trial.trial_id, getattr(trial, "config", {}), last.get(self.metric))

    def result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> float | None:
        """An epoch's result; returns its objective value (None: unscored epoch or failure)."""
        self.states[trial_id] = "running"
        self.epochs[trial_id] = int(result.get("training_iteration", 0) or 0)
        seconds = result.get("time_this_iter_s")
        if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
            self._epoch_s += float(seconds)
            self._epoch_n += 1
        if FAILED_KEY in result or PRUNED_KEY in result:
            return None
        return self._value(trial_id, config, result.get(self.metric))

    def end(self, trial_id: str, state: str) -> None:
        """A trial ended: complete / pruned / failed."""
        self.states[trial_id] = state

    def _value(self, trial_id: str, config: dict[str, Any], value: Any) -> float | None:
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)):
            return None
        value = float(value)
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_trial = value, trial_id
        if self.baseline is not None and is_baseline(dict(config), self.baseline):
            self.baseline_value = value
        return value

    # ---- outputs ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("running", "complete", "pruned", "failed"), 0)
        for state in self.states.values():
            out[state] = out.get(state, 0) + 1
        return out

    @property
    def finished(self) -> int:
        c = self.counts()
        return c["complete"] + c["pruned"] + c["failed"]

    def seconds_left(self) -> float | None:
        """Estimated seconds until the budget is spent; None before the first timed epoch."""
        if not self._epoch_n:
            return None
        owed = sum(max(0, self.max_epochs - self.epochs.get(t, 0))
                   for t, s in self.states.items() if s == "running")
        owed += max(0, self.trials - len(self.states)) * self.max_epochs
        return owed * (self._epoch_s / self._epoch_n) / self.concurrency

    def summary(self) -> str:
        """``running 2 · complete 3 · pruned 1 · failed 0 · best 0.2310 (baseline 0.2860) · ~4 min left``"""
        c = self.counts()
        parts = [f"running {c['running']}", f"complete {c['complete']}", f"pruned {c['pruned']}",
                 f"failed {c['failed']}"]
        if self.best is not None:
            base = f"{self.baseline_value:.4f}" if self.baseline_value is not None else "pending"
            parts.append(f"best {self.metric} {self.best:.4f} (baseline {base})")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"~{_duration(left)} left")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


#: Environment variable that forces the progress view: bar, lines or quiet (``--quiet`` sets
#: it). An environment variable, not only a constructor argument, because a resumed search
#: runs the callbacks Ray Tune unpickled from the original search, not new ones.
PROGRESS_ENV = "CALOTUNE_PROGRESS"
PROGRESS_MODES = ("bar", "lines", "quiet")


def progress_mode(quiet: bool, stream: Any = None) -> str:
    """"bar" on an interactive terminal; "lines" (one log line per epoch and per trial end)
    when stdout or stderr is not a terminal (a batch log, CI); "quiet" (trial ends only)
    when asked. A bar in a log file is a mess of carriage returns, hence the TTY test."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if quiet or forced == "quiet":
        return "quiet"
    if forced in PROGRESS_MODES:
        return forced
    streams = [sys.stdout, stream or sys.stderr]
    try:
        interactive = all(s is not None and s.isatty() for s in streams)
    except (AttributeError, ValueError):  # a closed or replaced stream
        interactive = False
    return "bar" if interactive and os.environ.get("TERM") != "dumb" else "lines"


class ProgressCallback(Callback):
    """The search's progress in the terminal: a tqdm bar (trials finished of the budget)
    whose status shows trials running / complete / pruned / failed, the best objective so
    far against the baseline, and the time left; one line per finished trial above it.

    Outside a terminal (a Slurm log, CI) it writes plain log lines instead, one per epoch
    result and per finished trial, each starting ``[done/total done]``; ``quiet`` keeps
    only the finished-trial lines. tqdm rather than rich: it is already installed with
    Optuna and draws one line, which is all this view needs.
    """

    def __init__(self, metric: str, mode: str, trials: int, max_epochs: int, *,
                 baseline: dict[str, Any] | None = None, concurrency: int = 1, quiet: bool = False,
                 stream: Any = None) -> None:
        self.state = ProgressState(metric, mode, trials, max_epochs, baseline, concurrency)
        self.quiet = quiet
        self.stream = stream
        self._mode: str | None = None
        self._bar: Any = None
        self._redirect: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # Tune pickles its callbacks with the experiment
        state["_bar"] = state["_redirect"] = None
        state["_mode"] = None
        state["stream"] = None
        state["_seeded"] = False  # a restored driver takes in the trials Tune restored
        return state

    def _seed(self, trials: list) -> None:
        """Count the trials Tune restored, once per driver: later trials arrive as events
        (seeding on every step walked every trial on every loop of Tune's, O(steps x trials))."""
        if not getattr(self, "_seeded", False):
            self.state.seed(trials)
            self._seeded = True

    @property
    def mode(self) -> str:
        if self._mode is None:
            self._mode = progress_mode(self.quiet, self.stream)
        return self._mode

    # ---- output -------------------------------------------------------------------
    def _prefix(self) -> str:
        return f"[{self.state.finished}/{self.state.trials} done]"

    def _refresh(self) -> None:
        if self.mode != "bar":
            return
        if self._bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log records go through tqdm.write while the bar is up, so lines never cut it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.state.trials, unit="trial", desc="search", file=self.stream or sys.stderr,
                             dynamic_ncols=True, leave=True, bar_format="{desc} {n_fmt}/{total_fmt} "
                             "|{bar:12}| {elapsed} {postfix}")
        self._bar.n = self.state.finished
        self._bar.set_postfix_str(self.state.summary(), refresh=True)

    def _line(self, level: int, text: str) -> None:
        if self._bar is not None:
            self._bar.write(f"{self._prefix()} {text}", file=self.stream or sys.stderr)
        else:
            log.log(level, "%s %s", self._prefix(), text)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.n = self.state.finished
            self._bar.set_postfix_str(self.state.summary(), refresh=True)
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    # ---- Tune's events ------------------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        self._seed(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._seed(trials)
        self.state.states.setdefault(trial.trial_id, "running")
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._seed(trials)
        value = self.state.result(trial.trial_id, dict(trial.config), result)
        if FAILED_KEY in result or PRUNED_KEY in result:
            return
        if self.mode == "lines":
            shown = f"{self.state.metric}={value:.4f}" if value is not None else "(unscored epoch)"
            self._line(logging.INFO, f"{trial.trial_id} epoch {result.get('training_iteration')}/"
                       f"{self.state.max_epochs} {shown} · {self.state.summary()}")
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        state, reason = trial_state(trial, self.state.max_epochs)
        self.state.end(trial.trial_id, state)
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        text = {"complete": "complete",
                "pruned": f"pruned: {reason}" if reason else f"stopped early at epoch {epochs}",
                "failed": f"FAILED: {reason}"}[state]
        self._line(logging.WARNING if state == "failed" else logging.INFO, f"{trial.trial_id} {text}")
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        if STOP.is_set():  # died with the interrupted driver: no failure, no line
            return
        self.state.end(trial.trial_id, "failed")
        self._line(logging.WARNING, f"{trial.trial_id} FAILED: {error_text(trial).splitlines()[-1]}")
        self._refresh()

    def on_experiment_end(self, trials, **info):
        self._close()


def result_state(last: dict[str, Any], max_epochs: int) -> tuple[str, str | None]:
    """complete / pruned / failed (with reason) from a trial's last result.

    The one rule for the MLflow state, the progress log and the search summary.
    """
    if FAILED_KEY in last:
        return "failed", str(last[FAILED_KEY])
    if PRUNED_KEY in last:  # the family judged its own model meaningless (a collapse)
        return "pruned", str(last[PRUNED_KEY])
    if STOPPED_KEY in last:  # a scheduler stopped it at a rung
        return "pruned", str(last[STOPPED_KEY])
    epochs = int(last.get("training_iteration", 0))
    return ("complete" if epochs >= max_epochs else "pruned"), None


def trial_state(trial, max_epochs: int) -> tuple[str, str | None]:
    """:func:`result_state` of a Tune trial that ended without a Ray error."""
    return result_state(trial.last_result or {}, max_epochs)


def error_text(trial) -> str:
    """The last line(s) of a failed trial's error, for humans and MLflow tags."""
    path = trial.error_file
    if path and os.path.isfile(path):
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        return "\n".join(lines[-3:])
    return str(trial.get_error() or "unknown error")


# --- assembling a Tuner --------------------------------------------------------------
def make_tuner(
    *,
    spec,
    ctx: TrialContext,
    data_ref: Any,
    baseline: dict[str, Any],
    parent_ref: Any = None,
    storage_path: Path | str,
    run_name: str,
    seed: int,
    trials: int,
    callback: MlflowTrialCallback,
    max_concurrent: int,
    resources: ResourceSpec,
    restore: bool,
    max_failures: int = 2,
    warm: Any = None,
    study_storage: str | None = None,
) -> tune.Tuner:
    """A Tuner over ``spec`` (or a restored one when ``restore``).

    ``study_storage``: a database URI (:mod:`calotune.tuning.studies`) into which every
    finished trial is copied, study ``run_name``, for ``optuna-dashboard``; None: no copy.
    A restored Tuner keeps the mirror its searcher was pickled with.

    ``warm``: a :class:`calotune.tuning.warmstart.WarmStart`: its configuration is the first
    trial (before the baseline) and its earlier trials seed the Optuna study.
    """
    import optuna

    if not logging.getLogger("calotune").isEnabledFor(logging.DEBUG):
        # Optuna installs its own INFO handler on import ("A new study created in memory")
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    trainable = tune.with_parameters(
        trial_driver, data_ref=[data_ref, parent_ref], ctx=asdict(ctx), resources=resources,
        storage_path=str(storage_path),
    )
    if resources.workers_per_trial == 1:
        trial_resources = {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial}
    else:
        # The DDP worker group requests its own CPUs/GPUs; the trial driver only waits on it,
        # so it takes no CPU (a token of memory: Ray refuses an empty resource request).
        # Any CPU held here would be missing when the worker group asks for all of them.
        trial_resources = {"cpu": 0, "memory": 1 << 20}
    trainable = tune.with_resources(trainable, trial_resources)
    if restore:
        return tune.Tuner.restore(f"{str(storage_path).rstrip('/')}/{run_name}", trainable,
                                  resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    from calotune.tuning import algorithms

    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    multi = len(metrics) > 1
    if spec.scheduler.type == "pbt":
        return _make_pbt_tuner(spec, trainable, baseline=baseline, storage_path=storage_path, run_name=run_name,
                               seed=seed, trials=trials, callback=callback, max_concurrent=max_concurrent,
                               max_epochs=ctx.max_epochs, max_failures=max_failures,
                               study_storage=study_storage)
    sampler = algorithms.make_sampler(spec.sampler.type, seed, {"multivariate": spec.sampler.multivariate,
                                                                "group": spec.sampler.group,
                                                                "n_startup_trials": spec.sampler.n_startup_trials})
    from calotune.tuning import warmstart

    mirror = None
    if study_storage is not None:
        from calotune.tuning.studies import StudyMirror

        mirror = StudyMirror(study_storage, run_name, ["minimize" if m == "min" else "maximize" for m in modes])
        mirror.open()  # listed (empty) from the start; a database that cannot be opened fails here
    searcher = FailAwareOptunaSearch(
        space=spec.suggest, metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0], points_to_evaluate=warmstart.points_to_evaluate(warm, baseline),
        sampler=sampler, warm_trials=warmstart.frozen_trials(spec, warm.trials) if warm is not None else None,
        study_mirror=mirror,
    )
    # several objectives: moasha or none (the spec and the --scheduler flag are checked)
    scheduler: TrialScheduler = algorithms.make_scheduler(
        spec.scheduler.type, metric=metrics, mode=modes, max_t=ctx.max_epochs,
        grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor,
        baseline=baseline)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=trials,
            max_concurrent_trials=max_concurrent, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=run_name, storage_path=str(storage_path),
            callbacks=[StopReasonCallback(scheduler), callback,
                       ProgressCallback(metrics[0], modes[0], trials, ctx.max_epochs,
                                        baseline=baseline, concurrency=max_concurrent),
                       InterruptCallback()],
            # two, not one: a driver killed between deleting the older checkpoint and the next
            # experiment snapshot must still find the one that snapshot names.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
        ),
    )


def _make_pbt_tuner(spec, trainable, *, baseline: dict[str, Any], storage_path: Path | str, run_name: str,
                    seed: int, trials: int, callback: MlflowTrialCallback, max_concurrent: int, max_epochs: int,
                    max_failures: int, study_storage: str | None) -> tune.Tuner:
    """A Tuner for population-based training (:mod:`calotune.tuning.pbt`): its population
    as fixed points of Tune's basic generator (Ray refuses a searcher beside PBT), no
    Optuna study, every checkpoint kept (an exploit may copy any member's latest decision
    checkpoint, which a ``num_to_keep`` of 2 could delete first)."""
    from calotune.tuning import pbt

    if study_storage is not None:
        log.info("pbt: no Optuna study %r is kept (configurations change while trials run)", run_name)
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    search_alg, scheduler, extra = pbt.make_search(spec, baseline=baseline, trials=trials, seed=seed,
                                                   metric=metric, mode=mode, max_epochs=max_epochs,
                                                   tracker_callback=callback)
    if max_concurrent < trials:
        # every member must exist for the ranking: Tune runs as many as the resources hold
        # (max_concurrent_trials is not applied) and pauses a member at each perturbation
        # epoch while others wait, so all advance in turn
        log.info("pbt: a population of %d, about %d training at once; members take turns between "
                 "perturbation epochs", trials, max_concurrent)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=trials,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=str(storage_path),
            callbacks=[StopReasonCallback(scheduler), callback, *extra,
                       ProgressCallback(metric, mode, trials, max_epochs, baseline=baseline,
                                        concurrency=max_concurrent),
                       InterruptCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
        ),
    )
