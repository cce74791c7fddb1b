"""Optuna samplers that survive pickling, as Ray Tune's experiment snapshots require.

Ray Tune pickles its search algorithm (and with it the Optuna sampler) into every
experiment snapshot, so a search can be resumed. Optuna 5.1 gave its genetic samplers
(NSGA-II, NSGA-III) a ``threading.Lock``, which cannot be pickled: a multi-objective
search then died before its first trial. These subclasses drop the lock from the pickled
state and make a new one when unpickled; nothing else changes. Module-level classes, so
that a snapshot can import them by name.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna


class _FreshLocks:
    """Pickle without thread locks; unpickle with new ones (state otherwise untouched)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: (None if _is_lock(v) else v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for key, value in state.items():
            if value is None and key.endswith("_lock"):
                setattr(self, key, threading.Lock())


def _is_lock(value: Any) -> bool:
    return type(value).__name__ in ("lock", "RLock", "_RLock")


class NSGAIISampler(_FreshLocks, optuna.samplers.NSGAIISampler):
    """optuna.samplers.NSGAIISampler that pickles (see the module docstring)."""


class NSGAIIISampler(_FreshLocks, optuna.samplers.NSGAIIISampler):
    """optuna.samplers.NSGAIIISampler that pickles (see the module docstring)."""
