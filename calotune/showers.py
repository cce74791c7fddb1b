"""The in-memory shower sample every part of calotune exchanges.

A detector-agnostic container keeps the trainer, the metrics glue and the tuner free of
any one detector's layout: conditions are per-event scalars, cells are per-part flat
arrays in the detector's documented voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ShowerSet:
    """A sample of N showers.

    conditions: name -> (N,) float array. "energy" (incident energy, MeV) is always
        present; detectors may add more (ZDC: "theta", "phi" in radians).
    cells: part name -> (N, n_cells) float array of deposited energy in MeV, >= 0
        (ZDC: "ecal", "hcal"; CaloChallenge: "showers").
    Arrays are float32, except CaloChallenge samples read from float64 files, which keep
    their dtype so that their evaluation matches the official one; training casts to float32.
    attrs: free-form provenance (detector, particle, seed, ...), written as HDF5 attrs.
    """

    conditions: dict[str, np.ndarray]
    cells: dict[str, np.ndarray]
    attrs: dict[str, str | int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {len(v) for v in self.conditions.values()} | {len(v) for v in self.cells.values()}
        if len(sizes) > 1:
            raise ValueError(f"ShowerSet arrays disagree on the number of events: {sorted(sizes)}")
        if "energy" not in self.conditions:
            raise ValueError("ShowerSet.conditions must contain 'energy' (MeV)")

    def __len__(self) -> int:
        return len(self.conditions["energy"])

    def subset(self, index: np.ndarray | slice) -> ShowerSet:
        """Events selected by an index array or slice (copies only what numpy copies)."""
        return ShowerSet(
            conditions={k: v[index] for k, v in self.conditions.items()},
            cells={k: v[index] for k, v in self.cells.items()},
            attrs=dict(self.attrs),
        )

    def batch_arrays(self, indices: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """The events at ``indices`` as ``{"conditions": {...}, "cells": {...}}`` numpy arrays.

        The trainer's only way into a sample besides ``len()`` and ``.conditions``: it
        copies one batch (fancy indexing) and never the whole sample, so a training split
        read zero-copy from Ray's object store stays shared, and a sample type with another
        cell layout (``calotune.pointclouds``: padded hits and a mask) plugs in by
        implementing the same method. Floating arrays are float32 (float64 files are
        cast here, one batch at a time).
        """
        def take(v: np.ndarray) -> np.ndarray:
            out = v[indices]
            return out.astype(np.float32, copy=False) if out.dtype.kind == "f" else out

        return {"conditions": {k: take(v) for k, v in self.conditions.items()},
                "cells": {k: take(v) for k, v in self.cells.items()}}

    def total_energy(self) -> np.ndarray:
        """Sum of all cells of all parts, (N,) MeV."""
        return np.sum([c.sum(axis=1) for c in self.cells.values()], axis=0)
