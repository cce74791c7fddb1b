"""What every model family provides, so that the trainer knows no family in particular.

A family is one file under ``calotune/models/`` holding a ``Config`` dataclass and a
:class:`GenerativeModel` subclass, registered in :mod:`calotune.models.registry`.
The trainer owns devices, data, distribution and reporting; the model owns its losses,
its optimisers and its update schedule (a GAN alternates critic and generator steps).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypedDict

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
