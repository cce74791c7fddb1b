"""What every model family provides, so that the trainer knows no family in particular.

A family is one file under ``calotune/models/`` holding a ``Config`` dataclass and a
:class:`GenerativeModel` subclass, registered in :mod:`calotune.models.registry`.

A Config field declares its value rules where it is declared, so that a search space can
be checked against them before any trial starts (see :func:`bounded`): its annotation
(``int``, ``float``, ``bool``, ``str``, a union or ``Literal``) is its type, and the
metadata keys ``ge``, ``gt``, ``le`` and ``lt`` are its bounds. Rules that tie several
fields together belong in the Config's ``__post_init__``, which raises ``ValueError``.
The trainer owns devices, data, distribution and reporting; the model owns its losses,
its optimisers and its update schedule (a GAN alternates critic and generator steps).
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypedDict, Union

import torch
from torch import nn


class TrialPruned(Exception):
    """Raised by a family to end its trial as pruned, with the reason, never scored.

    For pathologies that make a trial's score meaningless rather than merely bad: a
    collapsed codebook, a mode-collapsed generator. Raise it from ``train_step``,
    :meth:`GenerativeModel.epoch_metrics` or ``sample``; the trainer reports the reason
    (MLflow tag ``calotune.pruned_reason``) and the search never ranks the trial. Under
    DDP decide on values that are identical on every rank (after ``all_reduce_mean``),
    or the other ranks wait forever in the next collective.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Batch(TypedDict):
    """One training batch on the model's device.

    conditions: name -> (B,) float32 (see :class:`calotune.showers.ShowerSet`).
    cells: part -> (B, n_cells) float32, MeV, for a cell-grid sample; a point-cloud sample
        (``calotune.pointclouds``) puts its padded hits and a boolean mask here instead.
        Floating arrays arrive as float32, others (masks, indices) keep their dtype.
    """

    conditions: dict[str, torch.Tensor]
    cells: dict[str, torch.Tensor]


# StepFn(loss, optimizer): zero_grad, backward, average gradients across DDP ranks, clip,
# optimizer.step(). Supplied by the trainer; the model calls it once per update.
StepFn = Callable[[torch.Tensor, torch.optim.Optimizer], None]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TrainContext:
    """What the trainer hands to every ``train_step``: one object instead of a growing list.

    Frozen, so a family cannot change the trainer's bookkeeping by accident; the trainer
    makes a new one per step (``dataclasses.replace``, a few microseconds).

    step: zero_grad, backward, gradient all-reduce over ranks, clip, optimizer.step();
        use it for every update, so gradient synchronisation stays the trainer's business.
    all_reduce_mean: the mean of a tensor over ranks (identity on one rank), for
        statistics a family must agree on across ranks (a codebook's usage counts, an
        RBM's chain statistics). Every rank must call it in the same order.
    epoch: 0-based epoch over the whole trial (all phases).
    global_step: 0-based count of train_step calls so far in the trial.
    phase: name of the current :class:`Phase`; phase_epoch: 0-based epoch within it.
    rank, world_size, device: where this step runs.
    """

    step: StepFn
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    epoch: int = 0
    global_step: int = 0
    phase: str = "train"
    phase_epoch: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class Phase:
    """One stage of a family's training schedule (a VQ-VAE before its GPT prior).

    name: passed to train_step as ``ctx.phase``.
    share: relative share of the trial's epochs (any positive number; shares are
        normalised over all phases).
    scoreable: whether a model at the end of an epoch of this phase can be judged by its
        samples. The trainer generates, scores, reports an objective, and keeps a best
        model only after epochs of a scoreable phase; after the others it reports the
        training losses only, so a scheduler can neither rank nor stop the trial on them.
    """

    name: str
    share: float = 1.0
    scoreable: bool = True


def allocate_epochs(phases: Sequence[Phase], max_epochs: int) -> list[tuple[Phase, int]]:
    """Phase of each of the trial's ``max_epochs`` epochs: (phase, epoch within phase).

    ``max_epochs`` means the same for every family: the total epochs a trial trains, over
    all phases, so that budgets (and ASHA's ``training_iteration``) compare like with
    like. It is split in proportion to the declared shares (largest remainder), each
    phase getting at least one epoch. Refused (ValueError): no phases, a non-positive share, duplicate
    names, fewer epochs than phases, or a last phase that is not scoreable (a trial must
    end on a score).
    """
    phases = list(phases)
    if not phases:
        raise ValueError("a family must declare at least one phase")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, but got {names}")
    if any(not (p.share > 0 and math.isfinite(p.share)) for p in phases):
        raise ValueError(f"phase shares must be positive, but got {[p.share for p in phases]}")
    if not phases[-1].scoreable:
        raise ValueError(f"the last phase must be scoreable, but {phases[-1].name!r} is not")
    if max_epochs < len(phases):
        raise ValueError(f"max_epochs >= number of phases ({len(phases)}: {names}) must hold, "
                         f"but got max_epochs={max_epochs}")
    total = sum(p.share for p in phases)
    exact = [max_epochs * p.share / total for p in phases]
    counts = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(len(phases)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in order[: max(0, max_epochs - sum(counts))]:
        counts[i] += 1
    while sum(counts) > max_epochs:  # minimum-one bumps overshot: take from the largest
        spare = [i for i in range(len(counts)) if counts[i] > 1]
        counts[max(spare, key=lambda i: (counts[i] - exact[i], counts[i]))] -= 1
    return [(p, k) for p, n in zip(phases, counts, strict=True) for k in range(n)]


#: Field-metadata keys of a Config field's bounds: value >= ge, > gt, <= le, < lt.
BOUND_KEYS = ("ge", "gt", "le", "lt")


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A Config field whose bounds are declared as data, not only enforced in code.

    ``noise_dim: int = bounded(16, gt=0)``. Declared bounds let the search-space loader
    check every corner of a declared range before Ray starts, instead of every trial
    failing in ``__post_init__`` after it has started.
    """
    metadata = {k: v for k, v in zip(BOUND_KEYS, (ge, gt, le, lt), strict=True) if v is not None}
    return field(default=default, metadata=metadata)


class ConfigFieldError(ValueError):
    """A value that breaks one field's declared type or bounds; ``name`` is the field."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@functools.cache
def _field_rules(cls: type) -> dict[str, tuple[Any, typing.Mapping[str, Any]]]:
    """Field name -> (resolved annotation, metadata), computed once per class: a space's
    corner checks build thousands of Configs. Families use ``from __future__ import
    annotations``, so annotations are strings until resolved here."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, Any), f.metadata) for f in fields(cls)}


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the declared type; bool is never an int, an int is a float."""
    kind = type(value)
    if hint is bool:
        return kind is bool
    if hint is int:  # numbers.Integral also admits NumPy integers, which samplers may hand over
        return kind is int or (kind is not bool and isinstance(value, numbers.Integral))
    if hint is float:
        return kind in (float, int) or (kind is not bool and isinstance(value, numbers.Real))
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    return True  # a type this checker does not know: the family's __post_init__ decides


def _bounds_rule(name: str, metadata: typing.Mapping[str, Any]) -> str:
    """``0 <= dropout < 1``, ``hidden_width > 0``: the rule as the error message states it."""
    lo = next(((metadata[k], op) for k, op in (("ge", "<="), ("gt", "<")) if k in metadata), None)
    hi = next(((metadata[k], op) for k, op in (("le", "<="), ("lt", "<")) if k in metadata), None)
    if lo and hi:
        return f"{lo[0]} {lo[1]} {name} {hi[1]} {hi[0]}"
    if lo:  # one-sided: written as ``name > 0``, the way a lower bound is usually read
        return f"{name} {'>=' if lo[1] == '<=' else '>'} {lo[0]}"
    if hi:
        return f"{name} {hi[1]} {hi[0]}"
    return name


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened: an error message stays one readable line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} characters)"


def check_field(cls: type, name: str, value: Any) -> None:
    """Check one value against a dataclass field's declared type and bounds.

    Raises ConfigFieldError naming the field, the rule and the value. Only per-field
    rules: rules between fields are the Config's ``__post_init__``'s business.
    """
    hint, metadata = _field_rules(cls).get(name, (Any, {}))
    if not _matches(value, hint):
        raise ConfigFieldError(
            name, f"{name} must be {_type_name(hint)}, but got {name}={show(value)} ({type(value).__name__})"
        )
    kind = type(value)
    if kind is bool or (kind not in (int, float) and not isinstance(value, numbers.Real)):
        return
    if not metadata and kind is int:
        return
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float: no bound or optimiser handles it
        finite = False
    if not finite:
        raise ConfigFieldError(name, f"{name} must be a finite number, but got {name}={show(value)}")
    ok = all((
        "ge" not in metadata or value >= metadata["ge"],
        "gt" not in metadata or value > metadata["gt"],
        "le" not in metadata or value <= metadata["le"],
        "lt" not in metadata or value < metadata["lt"],
    ))
    if not ok:
        raise ConfigFieldError(
            name, f"{_bounds_rule(name, metadata)} must hold, but got {name}={show(value)}"
        )


def check_fields(config: Any) -> None:
    """Check every field of a dataclass instance (call it first in ``__post_init__``)."""
    for name in _field_rules(type(config)):
        check_field(type(config), name, getattr(config, name))


#: JSON-safe values a preparation may hold besides tensors.
JSONValue = None | bool | int | float | str | list | dict


class Prepared(nn.Module):
    """Holder of a model's preparation: tensors as buffers, the rest as JSON.

    Buffers travel with the model: ``.to(device)``, ``state_dict()``, DDP broadcast, and
    ``weights.pt`` (key ``prepared.<name>``); the JSON part is written into model.json and
    into checkpoints. Its shapes depend on the data, so a loader creates the buffers from
    the description first (:meth:`GenerativeModel.load_preparation`), then loads weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.json: dict[str, JSONValue] = {}


class GenerativeModel(nn.Module, ABC):
    """A conditional shower generator with its own training step.

    The contract, beyond the abstract methods (every hook has a default that a family
    with one plain training stage never needs to override):

    - :meth:`phases`: the ordered training stages; the trial's ``max_epochs`` is their
      total (:func:`allocate_epochs`).
    - :meth:`prepare`: once per trial, before training, statistics of the training split
      (a normalisation, a hits-per-energy histogram); stored with the model so a loaded
      model samples identically.
    - :meth:`training_state` / :meth:`load_training_state`: everything the trainer cannot
      see that a resumed trial needs to take the very same next step (LR schedulers, EMA
      weights, persistent Gibbs chains). Optimiser states, the model's ``state_dict`` and
      the random-generator states are saved by the trainer. Weights that ``sample`` uses
      (EMA weights used for sampling, say) belong in the ``state_dict`` as buffers, so
      that they are part of the saved model.
    - :meth:`validation_sample_kwargs`: extra ``sample`` arguments that make validation
      cheaper (fewer diffusion or Gibbs steps); scores made with them are reported under
      names suffixed ``_fast`` (see :mod:`calotune.tuning.worker`).
    - :meth:`epoch_metrics`: per-epoch health numbers (codebook usage, RBM chain mixing),
      reported as ``health_<name>``; may raise :class:`TrialPruned`.
    - :meth:`inherit`: take over a registered parent model's trained parts, for a search
      that retrains only some phases (see ``PHASE_PARAMS`` below).

    Module-level declarations of a family (optional), read by the search-space loader:

    - ``SAMPLING_PARAMS``: Config fields that change only how ``sample`` runs (a
      temperature, a sampler's step count), never a parameter's shape. A search with a
      ``base_model`` and no ``train_phases`` varies only these, on the parent's weights.
    - ``PHASE_PARAMS``: phase name -> Config fields that change only that phase's modules
      or training. A search with ``train_phases`` varies only those phases' fields (and
      the sampling ones), and everything else is the parent's.

    Shower kinds: for a ``"points"`` detector, batches carry ``cells = {"hits": (B, M, 4),
    "mask": (B, M)}`` and ``sample`` returns ``{"hits": (H, 4), "offsets": (B + 1,)}``
    (:data:`POINTS_OUTPUT`), one event per condition row.
    """

    def __init__(self) -> None:
        super().__init__()
        self.prepared = Prepared()

    @abstractmethod
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """Create the optimisers, once, after the model is on its device."""

    @abstractmethod
    def train_step(
        self, batch: Batch, optimizers: list[torch.optim.Optimizer], ctx: TrainContext
    ) -> dict[str, float | torch.Tensor]:
        """One optimisation step on a batch; return the loss terms, as Python floats or
        (better on a GPU) detached 0-d tensors, which the trainer sums on the device and
        reads once per epoch: a ``float()`` per term is a host-device synchronisation.

        Use ``ctx.step(loss, optimizer)`` for every update so that the trainer can handle
        gradient synchronisation. A non-finite loss is detected by the trainer.
        """

    @abstractmethod
    @torch.no_grad()
    def sample(
        self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Generate one shower per condition row: part -> (B, n_cells), MeV, all >= 0.

        ``kwargs`` are the family's cost knobs (see :meth:`validation_sample_kwargs`);
        without them, sampling is at full cost, as for the test split and for users.
        """

    # ---- optional hooks -------------------------------------------------------------
    def phases(self) -> tuple[Phase, ...]:
        """The ordered training phases; default: one scoreable phase named ``train``."""
        return (Phase("train"),)

    def prepare(self, train: Any) -> dict[str, torch.Tensor | JSONValue]:
        """Statistics of the training split, computed once per trial (default: none).

        ``train`` offers ``len()``, ``.conditions`` (name -> (N,) numpy) and
        ``batch_arrays(indices)`` (see :class:`calotune.showers.ShowerSet`); read cells
        through batch_arrays, in chunks, never as a whole. Return name -> tensor or
        JSON-safe value; the trainer applies it with :meth:`load_preparation` on every
        rank (the result must be the same on all), and the family reads it back as
        ``self.prepared.<name>`` (tensors) or ``self.prepared.json[name]``.
        """
        return {}

    def load_preparation(self, prepared: dict[str, torch.Tensor | JSONValue]) -> None:
        """Store a preparation on the model: tensors as buffers, the rest as JSON.

        Called by the trainer after :meth:`prepare` and by :func:`calotune.artifacts.load_model`
        (from model.json and weights.pt) before the weights are loaded.
        """
        ref = next(iter(self.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        holder = Prepared()
        for name, value in prepared.items():
            if not name.isidentifier():
                raise ValueError(f"preparation names must be identifiers, but got {name!r}")
            if isinstance(value, torch.Tensor):
                holder.register_buffer(name, value.detach().to(device).clone())
            else:
                holder.json[name] = value
        self.prepared = holder

    def preparation(self) -> dict[str, torch.Tensor | JSONValue]:
        """The current preparation (tensors on CPU), as :meth:`load_preparation` takes it."""
        out: dict[str, torch.Tensor | JSONValue] = {
            k: v.detach().cpu() for k, v in self.prepared.named_buffers()
        }
        out.update(self.prepared.json)
        return out

    def training_state(self) -> dict[str, Any]:
        """Family state outside ``state_dict`` and the optimisers (default: none).

        Tensors, numbers, strings, lists and dicts only: checkpoints are read with
        ``torch.load(weights_only=True)``.
        """
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""

    def validation_sample_kwargs(self) -> dict[str, Any]:
        """``sample`` arguments for per-epoch validation (default: none, full cost)."""
        return {}

    def epoch_metrics(self, ctx: TrainContext) -> dict[str, float]:
        """Health of the model after an epoch's training (default: none).

        Called on every rank, in the same order, before validation, so a family may call
        ``ctx.all_reduce_mean`` here (a codebook's usage over all ranks' batches). Rank 0's
        values are reported under ``health_<name>`` with the epoch's other metrics. Raise
        :class:`TrialPruned` for a model whose scores would be meaningless.
        """
        return {}

    def inherit(self, parent: GenerativeModel, train_phases: tuple[str, ...]) -> None:
        """Take over what ``parent`` (a registered model of this family) trained in the
        phases that are not retrained; called after :meth:`load_preparation`.

        Default: the parent's whole ``state_dict``, strictly (the trained phases start
        from the parent's weights: a fine-tune). Override when the retrained phases'
        modules may change shape or must start fresh (a new prior on a frozen encoder).
        """
        self.load_state_dict(parent.state_dict())


#: Keys of ``sample``'s output for a "points" detector: flat hits and per-event offsets.
POINTS_OUTPUT = ("hits", "offsets")
