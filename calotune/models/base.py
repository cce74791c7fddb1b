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
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any, Literal, TypedDict, Union

import torch
from torch import nn


class Batch(TypedDict):
    """One training batch on the model's device.

    conditions: name -> (B,) float32 (see :class:`calotune.showers.ShowerSet`).
    cells: part -> (B, n_cells) float32, MeV.
    """

    conditions: dict[str, torch.Tensor]
    cells: dict[str, torch.Tensor]


# StepFn(loss, optimizer): zero_grad, backward, average gradients across DDP ranks, clip,
# optimizer.step(). Supplied by the trainer; the model calls it once per update.
StepFn = Callable[[torch.Tensor, torch.optim.Optimizer], None]


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


class GenerativeModel(nn.Module, ABC):
    """A conditional shower generator with its own training step."""

    @abstractmethod
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """Create the optimisers, once, after the model is on its device."""

    @abstractmethod
    def train_step(
        self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: StepFn
    ) -> dict[str, float]:
        """One optimisation step on a batch; return the loss terms as Python floats.

        Use ``step(loss, optimizer)`` for every update so that the trainer can handle
        gradient synchronisation. A non-finite loss is detected by the trainer.
        """

    @abstractmethod
    @torch.no_grad()
    def sample(
        self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Generate one shower per condition row: part -> (B, n_cells), MeV, all >= 0."""
