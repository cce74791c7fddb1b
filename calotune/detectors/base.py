"""What every detector provides: geometry, synthetic reference showers, file I/O, scores.

The search, trainer, promotion and generation code only talk to this interface, so a new
detector is one new file plus one registry line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from calotune.showers import ShowerSet


class Detector(ABC):
    """A calorimeter: its cell layout, a synthetic shower source, its file layout, metrics."""

    #: registry name, e.g. "zdc"; also the MLflow registered-model name.
    name: str
    #: condition names in ShowerSet.conditions, "energy" first.
    conditions: tuple[str, ...]
    #: part names in ShowerSet.cells, with their widths in :attr:`part_sizes`.
    parts: tuple[str, ...]

    @property
    @abstractmethod
    def part_sizes(self) -> dict[str, int]:
        """part -> number of cells."""

    @abstractmethod
    def geometry_dict(self) -> dict[str, Any]:
        """JSON-safe geometry, enough to rebuild this detector with :meth:`from_geometry`."""

    @classmethod
    @abstractmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> Detector:
        """Inverse of :meth:`geometry_dict`."""

    @abstractmethod
    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Synthetic reference showers (parametrised, physics.md section 7)."""

    @abstractmethod
    def read(self, path: Path, max_events: int | None = None) -> ShowerSet:
        """Read and validate an HDF5 file (its first ``max_events`` rows if given); raise
        UserError naming file and key. Files are untrusted: use calotune.data.hdf5's checked
        path, which bounds memory and turns every h5py failure into a UserError."""

    @abstractmethod
    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the conditions of a file (``generate --conditions`` needs no cells)."""

    @abstractmethod
    def write(self, path: Path, showers: ShowerSet) -> None:
        """Write an HDF5 file in this detector's documented layout, atomically."""

    @abstractmethod
    def write_stream(self, path: Path, batches: Iterable[ShowerSet], attrs: dict[str, Any] | None = None) -> int:
        """Write batches as they come (memory bounded by one batch), atomically; the file is
        read back by :meth:`read` exactly as :meth:`write` would have written it. Returns
        the number of events written."""

    @abstractmethod
    def objectives(self) -> dict[str, str]:
        """Score names :meth:`scores` returns -> optimisation mode ("min" or "max")."""

    @abstractmethod
    def scores(self, reference: ShowerSet, generated: ShowerSet) -> dict[str, float]:
        """Physics scores of ``generated`` against ``reference`` (keys of objectives())."""

    @abstractmethod
    def plot(self, reference: ShowerSet, generated: ShowerSet, out_dir: Path) -> list[Path]:
        """Reference-vs-generated distribution plots as PNG files in ``out_dir``."""
