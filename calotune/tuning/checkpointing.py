"""When a trial writes a checkpoint: only where the scheduler or a resume needs one.

A checkpoint costs a ``torch.save`` of model, optimisers and random streams, a copy of the
best model and Ray's copy into the experiment's storage: about 0.06 s for the smallest
model, and far more for a large one on shared storage. Writing one after every epoch made
it the largest per-trial cost of a search of short trials, so a trial writes one only

- after an epoch at which its scheduler may stop, pause or perturb it (ASHA's rungs, every
  epoch for the median rule and HyperBand, PBT's perturbation interval): a stopped trial's
  latest checkpoint then holds the model that earned its last score, and a paused or
  exploited trial continues from exactly that state;
- after its last epoch (the model the search scores and registers);
- when ``every_s`` seconds have passed since its previous checkpoint (default
  :data:`DEFAULT_EVERY_S`; ``resources.checkpoint_every_s`` in a space, 0 for every epoch),
  so a lost node or a killed search loses at most that much training per trial.

The epochs between two checkpoints are re-run after a resume. They give the same numbers
again (the checkpoint restores every random stream), and the tracker keeps the first record
of each epoch (:class:`calotune.tuning.runner.MlflowTrialCallback`), so nothing is logged
twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: Seconds of training a trial may lose to a crash: the longest gap between its checkpoints.
DEFAULT_EVERY_S = 60.0


def decision_epochs(scheduler: str, max_epochs: int, *, grace_period: int = 1, reduction_factor: int = 2,
                    perturbation_interval: int | None = None) -> tuple[int, ...] | None:
    """The epochs (1-based) after which ``scheduler`` may stop, pause or perturb a trial.

    None means every epoch (the scheduler may act after any report). ``max_epochs`` is
    always included: a finished trial's last checkpoint carries its model.
    """
    from calotune.tuning.algorithms import rung_epochs

    if scheduler in ("asha", "moasha"):
        epochs = set(rung_epochs(grace_period, reduction_factor, max_epochs))
    elif scheduler == "none":
        epochs = set()
    elif scheduler == "pbt" and perturbation_interval:
        epochs = set(range(perturbation_interval, max_epochs + 1, perturbation_interval))
    else:  # median (any epoch past its grace period), hyperband (pauses between brackets), unknown
        return None
    return tuple(sorted(epochs | {max_epochs}))


@dataclass
class CheckpointPolicy:
    """Decides, epoch by epoch inside a trial, whether to write a checkpoint."""

    epochs: tuple[int, ...] | None
    every_s: float = DEFAULT_EVERY_S
    _last: float | None = None

    def start(self) -> None:
        """The trial (or its resumed run) starts: the interval counts from now."""
        self._last = time.monotonic()

    def due(self, epoch: int) -> bool:
        """Whether to write a checkpoint after epoch ``epoch`` (1-based)."""
        now = time.monotonic()
        if self._last is None:
            self._last = now
        if (self.epochs is None or epoch in self.epochs or self.every_s <= 0
                or now - self._last >= self.every_s):
            self._last = now
            return True
        return False
