"""What every detector provides: geometry, synthetic reference showers, file I/O, scores.

The search, trainer, promotion and generation code only talk to this interface, so a new
detector is one new package plus one registry line. Every detector package has the same
modules: ``geometry``, ``synthesis``, ``io``, ``evaluation``, ``plots`` (and ``detector``,
re-exported by its ``__init__``), and passes ``tests/test_conformance_detectors.py``.

Shower kinds: a "grid" detector holds :class:`~calotune.showers.ShowerSet` (fixed cells);
a "points" detector holds :class:`~calotune.pointclouds.PointCloudSet` (variable-length
hits). A grid detector that gives its cell centres (:meth:`Detector.cell_centres`) and
the inverse map (:meth:`Detector.locate`) converts both ways, so point-cloud models can
be trained on, and scored against, grid data with the grid's own metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.pointclouds import PointCloudSet


class Detector(ABC):
    """A calorimeter: its cell layout, a synthetic shower source, its file layout, metrics."""

    #: registry name, e.g. "zdc"; also the MLflow registered-model name.
    name: str
    #: condition names in ShowerSet.conditions, "energy" first.
    conditions: tuple[str, ...]
    #: part names in ShowerSet.cells, with their widths in :attr:`part_sizes`.
    parts: tuple[str, ...]
    #: "grid": samples are ShowerSets; "points": PointCloudSets (calotune.pointclouds).
    shower_kind: Literal["grid", "points"] = "grid"

    @property
    @abstractmethod
    def part_sizes(self) -> dict[str, int]:
        """part -> number of cells. A "points" detector returns ``{"hits": 4 * max hits per
        event}``: an upper bound of the values per event, which the disk and memory checks
        of ``generate`` and the synthetic cache use unchanged."""

    @abstractmethod
    def geometry_dict(self) -> dict[str, Any]:
        """JSON-safe geometry, enough to rebuild this detector with :meth:`from_geometry`."""

    @classmethod
    @abstractmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> Detector:
        """Inverse of :meth:`geometry_dict`."""

    @abstractmethod
    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Synthetic reference showers (parametrised, GFlash, hep-ex/0001020)."""

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

    def default_objective(self) -> tuple[str, str]:
        """(metric, mode) a search optimises when its spec names none; one of :meth:`objectives`.

        The generic spec must not default to one detector's metric; this default (the
        first declared objective) is overridden by detectors with a better single number.
        """
        metric, mode = next(iter(self.objectives().items()))
        return metric, mode

    # ------------------------------------------------------------- point clouds

    def cell_centres(self) -> dict[str, np.ndarray]:
        """part -> (n_cells, 3) cell-centre (x, y, z) in mm, in file order (grid detectors)."""
        raise NotImplementedError(f"{self.name} has no point-cloud geometry")

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position of the part in :attr:`parts`, or -1 outside the grid; flat cell index)
        of points (H, 3) in mm; the inverse of :meth:`cell_centres` (grid detectors)."""
        raise NotImplementedError(f"{self.name} has no point-cloud geometry")

    def to_point_cloud(self, showers: ShowerSet) -> PointCloudSet:
        """One hit per non-zero cell at the cell centre (:func:`calotune.pointclouds.grid_to_point_cloud`)."""
        from calotune.pointclouds import grid_to_point_cloud

        return grid_to_point_cloud(showers, self.cell_centres())

    def voxelise(self, cloud: PointCloudSet) -> ShowerSet:
        """Hits summed into this detector's cells, so its grid metrics apply unchanged;
        ``voxelise(to_point_cloud(s))`` gives back the cell energies of ``s`` exactly."""
        from calotune.pointclouds import grid_voxelise

        return grid_voxelise(cloud, {p: self.part_sizes[p] for p in self.parts}, self.locate)
