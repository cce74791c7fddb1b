"""The per-worker training loop: one function for 1 CPU, 1 GPU or N DDP workers.

It knows no model family and no detector: it builds both from the trial context, feeds
batches to ``model.train_step``, and once per epoch generates the validation sample, asks
the detector for its physics scores and hands them to a :class:`Reporter`. The reporter
is the only thing that differs between running in-process in a Tune trial (the fast path)
and inside a Ray Train ``TorchTrainer`` worker group (DDP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from calotune.artifacts import save_model
from calotune.data.splits import Splits, validation_subset
from calotune.detectors import get_detector
from calotune.models.base import (
    Batch,
    GenerativeModel,
    Phase,
    TrainContext,
    TrialPruned,
    allocate_epochs,
)
from calotune.models.registry import build_model
from calotune.sampling import generate_batches
from calotune.spec import TRAINER_PARAMS, TrainerConfig
from calotune.tuning.checkpointing import DEFAULT_EVERY_S, CheckpointPolicy

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
BEST_DIR = "best"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf: the trial is failed, never scored with a sentinel."""


@dataclass(frozen=True)
class TrialContext:
    """Everything a worker needs besides the sampled parameters; JSON-safe."""

    family: str
    detector: str
    geometry: dict[str, Any]
    objectives: tuple[tuple[str, str], ...]  # (metric, mode)
    max_epochs: int
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)
    validation_batch: int = 1000
    #: Most validation events generated and scored per epoch (a fixed random subset of a
    #: larger validation split; ``calotune.spec.DEFAULT_VALIDATION_EVENTS`` says why).
    validation_events: int | None = None
    grad_clip: float = 10.0
    #: A search on a registered model: None trains every phase from scratch; a tuple
    #: retrains only those phases on the parent's other parts; () trains nothing (a
    #: sampling-only search: one validation per trial).
    train_phases: tuple[str, ...] | None = None
    #: The registered parent ("name/version") of such a search, for the record.
    parent: str | None = None
    #: Data size as a fidelity: the fraction of the training events each epoch trains on,
    #: one per epoch (``calotune.tuning.algorithms.epoch_fractions``); None: all, always.
    data_fractions: tuple[float, ...] | None = None
    #: The epochs (1-based) after which the scheduler may act on the trial, where a
    #: checkpoint is always written (``calotune.tuning.checkpointing``); None: every epoch.
    checkpoint_epochs: tuple[int, ...] | None = None
    #: Longest training time (s) between two checkpoints; 0: a checkpoint every epoch.
    checkpoint_every_s: float = DEFAULT_EVERY_S


# report(metrics, checkpoint_dir or None): forwards one epoch's result to Tune / Train.
Reporter = Callable[[dict[str, Any], Path | None], None]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: On a GPU, how many steps may pass between two reads of the device-side finiteness flag:
#: each read is a host synchronisation, and a NaN trial loses at most this many steps.
CHECK_EVERY_CUDA = 50
#: The same on a CPU, where a read costs nothing (tests raise it to exercise the deferred path).
CHECK_EVERY_CPU = 1


class StepFn:
    """zero_grad, backward, average gradients over ranks, clip, step: ``TrainContext.step``.

    Gradients are all-reduced by hand rather than through DDP's wrapper because GAN-style
    families alternate several optimisers over sub-modules inside ``train_step``; averaging
    the gradients of exactly the parameters an optimiser owns works for any schedule. They
    travel as one flat buffer per dtype: one collective per step instead of one per tensor
    (5x faster for the ZDC model on 2 gloo ranks).

    Non-finite losses: the flag is kept on the loss's device and read every step on CPU
    (free) and every :data:`CHECK_EVERY_CUDA` steps on a GPU (a read synchronises host and
    device); :meth:`check` reads it at once (the trainer calls it before every score). All
    ranks read it together (MIN over ranks), so they stop together instead of leaving the
    others waiting in a collective.
    """

    def __init__(self, world_size: int, grad_clip: float) -> None:
        self.world_size = world_size
        self.grad_clip = grad_clip
        self._finite: torch.Tensor | None = None
        self._calls = 0

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._calls += 1
        if self._calls % (CHECK_EVERY_CUDA if loss.device.type == "cuda" else CHECK_EVERY_CPU) == 0:
            self.check()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loss.device.type, enabled=False):  # bf16 steps: backward in the forward's dtypes
            loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.world_size > 1:
            for p in params:
                if p.grad is None:  # e.g. an expert no sample routed to on this rank: every
                    p.grad = torch.zeros_like(p)  # rank must all-reduce the same tensors
            _all_reduce_mean_flat([p.grad for p in params], self.world_size)
        params = [p for p in params if p.grad is not None]
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        optimizer.step()

    def check(self) -> None:
        """Raise NonFiniteLossError (on every rank) if any loss since the last check was not finite."""
        if self._finite is None:
            return
        flag = self._finite.to(torch.float32)
        self._finite = None
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1:
            raise NonFiniteLossError("the loss became non-finite (NaN or Inf) on at least one rank")


def make_step_fn(world_size: int, grad_clip: float) -> StepFn:
    """The trainer's :class:`StepFn` for ``world_size`` ranks (kept for callers and tests)."""
    return StepFn(world_size, grad_clip)


def trainer_config(ctx: TrialContext, params: dict[str, Any]) -> TrainerConfig:
    """The trainer's settings of a trial: sampled over fixed over :class:`TrainerConfig`'s defaults."""
    merged = {**{k: v for k, v in ctx.fixed.items() if k in TRAINER_PARAMS},
              **{k: v for k, v in params.items() if k in TRAINER_PARAMS}}
    if "batch_size" in merged:
        merged["batch_size"] = int(merged["batch_size"])
    if "compile" in merged:
        merged["compile"] = bool(merged["compile"])
    return TrainerConfig(**merged)


def compile_submodules(model: torch.nn.Module) -> None:
    """``torch.compile`` each direct sub-network in place (``nn.Module.compile``).

    The family's ``train_step`` and ``sample`` are ordinary methods that call its
    sub-networks, so compiling those, not a wrapper around the model, is what speeds up
    a step; compiling in place keeps the state_dict keys, so checkpoints and saved
    models are the same as without it.
    """
    for child in model.children():
        if any(True for _ in child.parameters()):
            child.compile()


def _all_reduce_mean_flat(grads: list[torch.Tensor], world_size: int) -> None:
    """Average tensors over ranks in place with one all-reduce per dtype (a flat copy)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def objective_value(metrics: dict[str, float], metric: str) -> float:
    """Look up an objective in an epoch's metrics; NaN scores fail the trial."""
    value = float(metrics[metric])
    if not math.isfinite(value):
        raise NonFiniteLossError(f"objective {metric} is {value}")
    return value


FAILED_KEY = "calotune_failed"
#: Result key of a trial the family pruned (:class:`TrialPruned`); the value is the reason.
PRUNED_KEY = "calotune_pruned"
#: Prefix of a family's per-epoch health metrics (:meth:`GenerativeModel.epoch_metrics`).
HEALTH_PREFIX = "health_"


def train(
    ctx: TrialContext,
    params: dict[str, Any],
    data: Splits,
    reporter: Reporter,
    *,
    device: torch.device,
    resume_dir: Path | None = None,
    parent: GenerativeModel | None = None,
) -> None:
    """Train one trial; a non-finite loss ends it as FAILED, a family's
    :class:`TrialPruned` as pruned with its reason (both reported, not raised).

    Reporting instead of raising keeps Ray's retry budget for infrastructure faults (a
    killed worker): a NaN or a collapsed codebook is deterministic and retrying it would
    only repeat it. Neither result carries a score, so nothing downstream can learn from
    a sentinel. ``parent`` is the registered model of a search that retrains only some
    phases (or none) of it (``ctx.train_phases``).
    """
    try:
        _train(ctx, params, data, reporter, device=device, resume_dir=resume_dir, parent=parent)
    except NonFiniteLossError as exc:
        log.warning("trial failed: %s", exc)
        reporter({FAILED_KEY: f"NonFiniteLossError: {exc}"}, None)
    except TrialPruned as exc:
        log.warning("trial pruned by its family: %s", exc.reason)
        reporter({PRUNED_KEY: exc.reason}, None)


def _train(
    ctx: TrialContext,
    params: dict[str, Any],
    data: Splits,
    reporter: Reporter,
    *,
    device: torch.device,
    resume_dir: Path | None = None,
    parent: GenerativeModel | None = None,
) -> None:
    """Train for ``ctx.max_epochs`` epochs over the family's phases, reporting after each.

    A checkpoint holds everything the next step depends on (model, preparation,
    optimisers, the family's training state, every rank's random generators, the epoch
    and step counters), so a resumed trial takes the same next step as one never stopped.
    """
    rank, world_size = _world()
    torch.manual_seed(ctx.seed)
    np_rng = np.random.default_rng(ctx.seed + 1000 * rank)
    detector = get_detector(ctx.detector, **ctx.geometry)
    model_params = {**{k: v for k, v in ctx.fixed.items() if k not in TRAINER_PARAMS},
                    **{k: v for k, v in params.items() if k not in TRAINER_PARAMS}}
    trainer = trainer_config(ctx, params)
    batch_size = trainer.batch_size
    model = build_model(ctx.family, model_params, detector).to(device)
    schedule = trial_schedule(model, ctx)
    state: dict[str, Any] | None = None
    if resume_dir is not None and (resume_dir / TRAIN_STATE).is_file():
        state = torch.load(resume_dir / TRAIN_STATE, map_location=device, weights_only=True)
    # The preparation is restored rather than recomputed on resume: it may be costly, and
    # the checkpoint's weights were trained against exactly this one. A parent's
    # preparation is kept: its frozen parts were trained against it.
    if state is not None:
        model.load_preparation(state["preparation"])
    elif parent is not None:
        model.load_preparation(parent.preparation())
        model.inherit(parent.to(device), tuple(ctx.train_phases or ()))
    else:
        model.load_preparation(model.prepare(data.train))
    if world_size > 1:  # identical start (and preparation) on every rank
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    optimizers = model.make_optimizers()
    if trainer.compile:
        compile_submodules(model)
    step = make_step_fn(world_size, ctx.grad_clip)
    base_ctx = TrainContext(step=step, all_reduce_mean=_all_reduce_mean(world_size), rank=rank,
                            world_size=world_size, device=device)
    metric, mode = ctx.objectives[0]
    multi = len(ctx.objectives) > 1
    sign = 1.0 if mode == "min" else -1.0

    start_epoch, best, global_step, events_total = 0, math.inf, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        # This trial's optimiser settings (learning rates, betas, ...), made from its own
        # params, before the checkpoint's overwrite them
        fresh = optimizer_settings(optimizers)
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if state.get("params") != params:
            # PBT's exploit resumes a trial from another trial's checkpoint under perturbed
            # params (calotune.tuning.pbt): load_state_dict put the old learning rates back.
            # The moments stay; the settings are this trial's. (No family keeps a learning-
            # rate schedule in its param_groups, so a checkpoint without params, written
            # before they were saved, gets the same settings again.)
            changed = reapply_optimizer_settings(optimizers, fresh)
            if changed:
                log.info("resuming from a checkpoint trained with other params: %s", "; ".join(changed))
        model.load_training_state(state.get("family", {}))
        start_epoch, best = int(state["epoch"]), float(state["best"])
        global_step = int(state.get("global_step", 0))
        events_total = int(state.get("events_total", 0))
        rng = state.get("rng", [])
        if len(rng) == world_size:
            _set_rng_state(rng[rank], np_rng, device)
        else:
            log.warning("checkpoint from %d rank(s), now %d: random streams restart", len(rng), world_size)
        log.info("resuming at epoch %d (best %s=%.5g)", start_epoch, metric, sign * best)

    # The best model so far lives here between epochs and is copied into every checkpoint,
    # so the latest checkpoint always carries both the resumable state and the best model.
    policy = CheckpointPolicy(ctx.checkpoint_epochs, ctx.checkpoint_every_s)
    policy.start()
    validation_cache: dict[str, Any] = {}  # the validation reference's summary, made once
    with tempfile.TemporaryDirectory(prefix="calotune-best-") as keep:
        best_dir = Path(keep) / BEST_DIR
        if resume_dir is not None and (resume_dir / BEST_DIR).is_dir():
            shutil.copytree(resume_dir / BEST_DIR, best_dir)
        for epoch in range(start_epoch, ctx.max_epochs):
            phase, phase_epoch = schedule[epoch]
            inject_fault(model, params, epoch + 1)
            epoch_ctx = dataclasses.replace(base_ctx, epoch=epoch, phase=phase.name, phase_epoch=phase_epoch)
            sums: dict[str, float] = {}
            n_batches, train_s, n_events = 0, 0.0, 0
            if phase is not SAMPLING_ONLY:
                # indices only: the data stays shared
                shard = epoch_shard(epoch_events(epoch, ctx.data_fractions, len(data.train), world_size),
                                    len(data.train), ctx.seed, rank, world_size)
                order = shard[np_rng.permutation(len(shard))]
                sums, n_batches, train_s = _train_epoch(model, optimizers, epoch_ctx, data.train, order,
                                                        batch_size, global_step, precision=trainer.precision)
                n_events = world_size * min(len(order), n_batches * batch_size)  # a short tail batch is skipped
            global_step += n_batches
            events_total += n_events
            metrics: dict[str, Any] = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
            metrics["epoch_time_s"] = train_s
            # the search's budget in trial-epoch-events (summed over trials by the search); a
            # sampling-only trial trains on nothing and reports no train_ metric at all
            if phase is not SAMPLING_ONLY:
                metrics["train_events"], metrics["train_events_total"] = n_events, events_total
            if ctx.data_fractions:
                metrics["train_data_fraction"] = float(ctx.data_fractions[epoch])
            health = model.epoch_metrics(epoch_ctx)
            metrics.update({f"{HEALTH_PREFIX}{k}": float(v) for k, v in health.items()})
            scores: dict[str, float] | None = None
            if phase.scoreable:
                scores = _validate(model, detector, data, ctx, epoch, rank, world_size, device, validation_cache)
            rng_states = _gather(_rng_state(np_rng, device), world_size)
            with tempfile.TemporaryDirectory(prefix="calotune-ckpt-") as tmp:
                checkpoint_dir: Path | None = None
                if rank == 0:
                    if scores is not None:  # only a scoreable epoch names an objective
                        metrics.update(scores)
                        metrics["node_id"] = _node_id()
                        value = objective_value(metrics, metric)
                        for other, _ in ctx.objectives[1:]:
                            # the per-epoch curve; the name itself is the trial's score, which
                            # the tracker records only for a trial that did not fail
                            metrics[f"{other}_epoch"] = objective_value(metrics, other)
                        # One objective: keep the best epoch (ASHA and TPE see the running best).
                        # Several: the trade-off is the final model's, so it is always the latest.
                        if sign * value < best or multi:
                            best = sign * value
                            shutil.rmtree(best_dir, ignore_errors=True)
                            save_model(best_dir, model, family=ctx.family, detector=detector,
                                       params=model_params,
                                       info={"epoch": epoch + 1, "phase": phase.name,
                                             "metrics": _floats(metrics)})
                        metrics[f"{metric}_epoch"] = value
                        if not multi:
                            metrics[metric] = sign * best
                if rank == 0 and policy.due(epoch + 1):
                    checkpoint_dir = Path(tmp)
                    torch.save({"model": model.state_dict(),
                                "preparation": model.preparation(),
                                "optimizers": [o.state_dict() for o in optimizers],
                                "family": model.training_state(),
                                "rng": rng_states,
                                "epoch": epoch + 1, "global_step": global_step, "best": best,
                                "events_total": events_total,
                                # the params it was trained with: a PBT exploit resumes it under others
                                "params": dict(params)},
                               checkpoint_dir / TRAIN_STATE)
                    if best_dir.is_dir():
                        shutil.copytree(best_dir, checkpoint_dir / BEST_DIR)
                reporter(metrics, checkpoint_dir)
            log.info("epoch %d/%d (%s) %s=%.5g (%.1fs)", epoch + 1, ctx.max_epochs, phase.name, metric,
                     metrics.get(metric, float("nan")), train_s)


#: The one "phase" of a sampling-only trial: no training, one validation of the parent's
#: weights under the trial's sampling parameters.
SAMPLING_ONLY = Phase("sampling", scoreable=True)


def trial_schedule(model: GenerativeModel, ctx: TrialContext) -> list[tuple[Phase, int]]:
    """(phase, epoch within phase) of each epoch of the trial (see :func:`phase_schedule`)."""
    return phase_schedule(model.phases(), ctx.train_phases, ctx.max_epochs)


def phase_schedule(phases: tuple[Phase, ...], train_phases: tuple[str, ...] | None,
                   max_epochs: int) -> list[tuple[Phase, int]]:
    """The one rule for which phases a trial trains, used by the trainer and by the
    search's check before Ray starts: all of the family's phases, or only
    ``train_phases`` (a search on a registered model), or for a sampling-only search
    (``train_phases == ()``) ``max_epochs`` rounds of :data:`SAMPLING_ONLY` (the search
    loader fixes that to one). ValueError from :func:`allocate_epochs` if they do not fit.
    """
    if train_phases is None:
        return allocate_epochs(phases, max_epochs)
    if not train_phases:
        return [(SAMPLING_ONLY, k) for k in range(max_epochs)]
    return allocate_epochs([p for p in phases if p.name in train_phases], max_epochs)


#: Seeds the one permutation of the training split that data fractions take prefixes of.
FIDELITY_STREAM = 0x0DA7A


def epoch_events(epoch: int, data_fractions: tuple[float, ...] | None, n_train: int, world_size: int = 1) -> int:
    """How many training events epoch ``epoch`` (0-based) trains on, over all ranks.

    All of them without data fractions (or at fraction 1). Otherwise the epoch's fraction,
    rounded down to a multiple of the ranks (equal shards give every rank the same number
    of batches, so no rank waits alone in a gradient all-reduce), and at least one per rank.
    """
    if not data_fractions or data_fractions[epoch] >= 1.0:
        return n_train
    n = int(data_fractions[epoch] * n_train)
    return min(n_train, max(world_size, n - n % world_size))


def epoch_shard(n_events: int, n_train: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's indices into the training split for an epoch on ``n_events`` of its events.

    All events: every ``world_size``-th, as without data fractions. Fewer: the first
    ``n_events`` of one permutation of the split seeded by the search's seed alone, so the
    subset is the same for every trial, on every rank and after a resume, and nested (a
    smaller fraction's events are among a larger one's); a prefix of the split itself could
    be biased where a file is ordered (by energy, say). The ranks then deal it out as they
    deal the whole split; the epoch's shuffle comes after, from each rank's generator.
    """
    if n_events >= n_train:
        # Every rank must take the same number of batches, or one waits forever in the
        # gradient all-reduce: a split that does not divide by the ranks is padded by
        # wrapping round to its first events (as torch's DistributedSampler does).
        return np.resize(np.arange(n_train), n_train + (-n_train) % world_size)[rank::world_size]
    chosen = np.random.default_rng([seed, FIDELITY_STREAM]).permutation(n_train)[:n_events]
    return np.sort(chosen)[rank::world_size]


#: Suffix of every validation score made at a family's reduced sampling cost.
FAST_SUFFIX = "_fast"


def _validate(model: GenerativeModel, detector: Any, data: Splits, ctx: TrialContext, epoch: int,
              rank: int, world_size: int, device: torch.device,
              cache: dict[str, Any] | None = None) -> dict[str, float] | None:
    """Scores of the validation sample (on rank 0; None elsewhere), generated by all ranks.

    Each rank generates a contiguous slice of the validation conditions in batches and
    reduces every batch at once to the detector's per-event summary
    (``Detector.summarise``), so no rank holds its generated showers; rank 0 gathers the
    summaries and scores them (``Detector.scores_from``: the numbers of ``scores`` on the
    whole sample). The reference's summary is made once per trial (``cache``): the subset
    is the same every epoch. With the family's
    ``validation_sample_kwargs()`` (cheaper sampling), every score and gen_time_ms is
    reported under its name suffixed ``_fast``, and the objectives Tune ranks on are copied
    under their plain names too: a scheduler and a searcher know one name, and every trial
    of a search is the same family at the same cost, so they stay comparable. The test
    split after the search is always scored at full cost, under the plain names.
    """
    from calotune.detectors.base import Summary, SummaryBuilder

    cache = {} if cache is None else cache
    kwargs = model.validation_sample_kwargs()
    # the same fixed subset every epoch and trial (seeded by the search's seed)
    reference = validation_subset(data.validation, ctx.validation_events, ctx.seed)
    if epoch == 0 and rank == 0:
        log.info("validation sample: %d of %d validation events", len(reference), len(data.validation))
    conditions = reference.conditions
    n = len(conditions["energy"])
    lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
    summary, seconds = None, 0.0
    if hi > lo:
        step = ctx.validation_batch
        batches = ({k: v[start : min(start + step, hi)] for k, v in conditions.items()}
                   for start in range(lo, hi, step))
        builder = SummaryBuilder(hi - lo)
        for showers, batch_s in generate_batches(model, batches, seed=ctx.seed + epoch + 1_000_003 * rank,
                                                 device=device, sample_kwargs=kwargs):
            seconds += batch_s
            builder.add(detector.summarise(showers))
            del showers  # one batch of generated cells at a time
        summary = builder.result()
    pieces = _gather((summary, seconds), world_size, to_rank0=True)
    if rank != 0:
        return None
    generated = Summary.concat([s for s, _ in pieces if s is not None])
    if "reference" not in cache:
        cache["reference"] = detector.summarise(reference)
    scores = dict(detector.scores_from(cache["reference"], generated))
    scores["gen_time_ms"] = 1e3 * sum(s for _, s in pieces) / max(n, 1)
    if not kwargs:
        return scores
    fast = {f"{k}{FAST_SUFFIX}": v for k, v in scores.items()}
    for name, _ in ctx.objectives:
        if name in scores:
            fast[name] = scores[name]
    fast["validation_fast"] = 1.0
    return fast


def _gather(obj: Any, world_size: int, *, to_rank0: bool = False) -> list[Any]:
    """``obj`` of every rank, in rank order (gloo or NCCL); [obj] on one rank."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    if to_rank0:
        dist.gather_object(obj, out if dist.get_rank() == 0 else None, dst=0)
    else:
        dist.all_gather_object(out, obj)
    return out


def _all_reduce_mean(world_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """TrainContext.all_reduce_mean: a new tensor, the mean over ranks (identity on one)."""
    if world_size == 1:
        return lambda tensor: tensor

    def mean(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / world_size

    return mean


def _rng_state(np_rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    """This rank's random streams: torch CPU, the device's CUDA stream, the shuffling Generator.

    NumPy's state holds 128-bit integers, kept as JSON text so that the checkpoint loads
    with ``torch.load(weights_only=True)`` whatever ints that accepts.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": json.dumps(np_rng.bit_generator.state)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: dict[str, Any], np_rng: np.random.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_rng.bit_generator.state = json.loads(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _to_device(arrays: dict[str, dict[str, np.ndarray]], device: torch.device,
               stream: Any = None) -> Batch:
    """numpy batch -> tensors on ``device``; on CUDA pinned and copied on ``stream``
    (non-blocking), so the next batch's copy overlaps this batch's compute."""
    if device.type != "cuda":
        return {"conditions": {k: torch.from_numpy(v) for k, v in arrays["conditions"].items()},
                "cells": {k: torch.from_numpy(v) for k, v in arrays["cells"].items()}}
    with torch.cuda.stream(stream):
        return {"conditions": {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True)
                               for k, v in arrays["conditions"].items()},
                "cells": {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True)
                          for k, v in arrays["cells"].items()}}


def _train_epoch(model: GenerativeModel, optimizers: list[torch.optim.Optimizer], ctx: TrainContext,
                 train_set: Any, order: np.ndarray, batch_size: int,
                 global_step: int, *, precision: str = "fp32") -> tuple[dict[str, float], int, float]:
    """One pass over this rank's shard; loss sums, batch count, seconds.

    Batches are gathered from host memory (``train_set.batch_arrays``) one at a time and
    the next one is prefetched while the model trains on the current one: device memory
    holds two batches, not the shard.
    """
    model.train()
    t0 = time.perf_counter()
    device = ctx.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    starts = list(range(0, max(len(order) - batch_size, 0) + 1, batch_size))

    def load(i: int) -> Batch:
        return _to_device(train_set.batch_arrays(order[i : i + batch_size]), device, stream)

    sums: dict[str, Any] = {}
    upcoming = load(starts[0]) if starts else None
    for j in range(len(starts)):
        batch = upcoming
        assert batch is not None
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            for group in batch.values():
                for t in group.values():
                    t.record_stream(torch.cuda.current_stream(device))
        upcoming = load(starts[j + 1]) if j + 1 < len(starts) else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = model.train_step(batch, optimizers,
                                      dataclasses.replace(ctx, global_step=global_step + j))
        for k, v in losses.items():  # floats, or tensors summed on the device (no sync)
            v = v.detach() if isinstance(v, torch.Tensor) else v
            sums[k] = sums[k] + v if k in sums else v
    if isinstance(ctx.step, StepFn):
        ctx.step.check()
    totals = _to_floats(sums)
    for k, v in totals.items():
        if not math.isfinite(v):
            raise NonFiniteLossError(f"{k} became {v}")
    return totals, len(starts), time.perf_counter() - t0


def _to_floats(sums: dict[str, Any]) -> dict[str, float]:
    """Loss sums as floats, reading every device tensor in one transfer (one sync per epoch)."""
    tensors = {k: v for k, v in sums.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in sums.items() if k not in tensors}
    if tensors:
        values = torch.stack([t.reshape(()).to(torch.float64) for t in tensors.values()]).cpu().tolist()
        out.update(zip(tensors, values, strict=True))
    return {k: out[k] for k in sums}


FAULT_ENV = "CALOTUNE_FAULT"


_FAULT_KEYS = {"kind": str, "epoch": int, "param": str, "above": (int, float), "once_file": str, "node": str}
_FAULT_KINDS = ("nan", "raise", "exit", "hang")


def parse_fault(text: str | None) -> dict[str, Any] | None:
    """``$CALOTUNE_FAULT`` checked: None when unset; UserError naming the variable if malformed.

    The search calls this before anything starts, so a typo fails the command with one
    line instead of failing every trial with a JSON traceback.
    """
    from calotune.errors import UserError

    if text is None or not text.strip():
        return None
    example = '{"kind": "nan", "epoch": 2}'
    try:
        fault = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{FAULT_ENV}={text!r}: not JSON ({exc.msg}); e.g. {FAULT_ENV}='{example}', "
                        f"or unset it") from None
    if not isinstance(fault, dict):
        raise UserError(f"{FAULT_ENV}={text!r}: must be a JSON object, e.g. '{example}'")
    unknown = sorted(set(fault) - set(_FAULT_KEYS))
    if unknown:
        raise UserError(f"{FAULT_ENV}: unknown key(s) {unknown}; allowed: {sorted(_FAULT_KEYS)}")
    if fault.get("kind") not in _FAULT_KINDS:
        raise UserError(f"{FAULT_ENV}: kind must be one of {', '.join(_FAULT_KINDS)}, but got "
                        f"{fault.get('kind')!r}")
    for key, kind in _FAULT_KEYS.items():
        value = fault.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise UserError(f"{FAULT_ENV}: {key} has the wrong type ({value!r})")
    if int(fault.get("epoch", 1)) < 1:
        raise UserError(f"{FAULT_ENV}: epoch must be >= 1, but got {fault['epoch']}")
    return fault


def inject_fault(model: torch.nn.Module, params: dict[str, Any], epoch: int) -> None:
    """Chaos testing: fail on purpose when ``$CALOTUNE_FAULT`` asks for it.

    JSON, e.g. ``{"kind": "nan", "epoch": 2, "param": "mask_loss_weight", "above": 1.0}``.
    kind "nan" poisons the weights (the real NaN path), "raise" raises, "exit" kills the
    worker process (an infrastructure fault; with ``"once_file"`` only the first time),
    "hang" blocks the trial until it is stopped from outside (a stuck data loader or
    collective; the interrupt tests use it to know a trial is still running at the signal).
    ``"node"`` (a Ray node id) limits the fault to the trials running on that node.
    Unset in normal use; the resilience tests set it. The search forwards it to every
    node of a cluster (``runtime_env``).
    """
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if fault is None:
        return
    if epoch != int(fault.get("epoch", 1)):
        return
    if "node" in fault and fault["node"] != _node_id():
        return
    if "param" in fault and not float(params.get(fault["param"], -math.inf)) > float(fault.get("above", -math.inf)):
        return
    once = fault.get("once_file")
    if once:
        if Path(once).exists():
            return
        Path(once).write_text(str(os.getpid()))
    kind = fault["kind"]
    log.warning("injecting fault %r at epoch %d", kind, epoch)
    if kind == "nan":
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(math.nan)
    elif kind == "raise":
        raise RuntimeError("injected failure (CALOTUNE_FAULT)")
    elif kind == "exit":
        os._exit(17)
    elif kind == "hang":
        threading.Event().wait()


def _node_id() -> str:
    """The Ray node this worker runs on (two nodes on one host share an IP, not an id)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        return "unknown"


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def optimizer_settings(optimizers: list[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Every param_group's settings (every key but 'params'), optimiser by optimiser."""
    return [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]


def reapply_optimizer_settings(optimizers: list[torch.optim.Optimizer],
                               settings: list[list[dict[str, Any]]]) -> list[str]:
    """Put ``settings`` (:func:`optimizer_settings` of optimisers made from this trial's
    params) into the loaded param_groups, keeping the loaded moments; returns what changed,
    as "optimizer i group j key: old -> new"."""
    changed = []
    for i, (opt, groups) in enumerate(zip(optimizers, settings, strict=True)):
        if len(opt.param_groups) != len(groups):
            raise ValueError(f"optimizer {i}: the checkpoint has {len(opt.param_groups)} param group(s), "
                             f"this model's optimiser {len(groups)}")
        for j, (group, wanted) in enumerate(zip(opt.param_groups, groups, strict=True)):
            for key, value in wanted.items():
                old = group.get(key)
                if not _same_setting(old, value):
                    changed.append(f"optimizer {i} group {j} {key}: {old!r} -> {value!r}")
                group[key] = value
    return changed


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
