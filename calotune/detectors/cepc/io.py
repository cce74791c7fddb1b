"""CEPC ECAL files: the point-cloud layout of :mod:`calotune.pointclouds` (flat hits + offsets).

Layout: ``incident_energies`` (N, 1) MeV, ``incident_px``, ``incident_py``, ``incident_pz``
(N, 1) MeV (the four-momentum, energy first), ``hits`` (H, 4) float32 [x, y, z] mm (global,
z along the beam; cell centres) and E MeV, ``offsets`` (N + 1,) int64; attributes
``detector``, ``shower_kind = "points"``, ``hit_columns`` and ``geometry`` (JSON of
:class:`~calotune.detectors.cepc.geometry.CEPCGeometry`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calotune.pointclouds import (
    PointCloudSet,
    read_point_cloud_conditions,
    read_point_clouds,
    write_point_cloud_stream,
    write_point_clouds,
)

if TYPE_CHECKING:
    from calotune.detectors.cepc.geometry import CEPCGeometry

__all__ = ["CONDITION_KEYS", "CEPCFiles"]

#: PointCloudSet condition -> HDF5 key.
CONDITION_KEYS: dict[str, str] = {
    "energy": "incident_energies",
    "px": "incident_px",
    "py": "incident_py",
    "pz": "incident_pz",
}


class CEPCFiles:
    """File I/O of the CEPC ECAL detector (a mixin: needs ``geometry``, ``name``, ``geometry_dict()``)."""

    geometry: CEPCGeometry
    name: str

    def geometry_dict(self) -> dict[str, Any]:  # provided by the detector
        raise NotImplementedError

    def _attrs(self, attrs: dict[str, Any] | None) -> dict[str, Any]:
        return {**(attrs or {}), "geometry": json.dumps(self.geometry_dict(), sort_keys=True)}

    def read(self, path: Path, max_events: int | None = None) -> PointCloudSet:
        """Read and check a file (every check of :func:`calotune.pointclouds.read_point_clouds`)."""
        return read_point_clouds(path, CONDITION_KEYS, max_events, detector_name=self.name,
                                 max_hits_per_event=self.geometry.max_hits)

    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the four-momenta of a file (its hits are checked for shape, not read)."""
        return read_point_cloud_conditions(path, CONDITION_KEYS, max_events, detector_name=self.name)

    def write(self, path: Path, showers: PointCloudSet) -> None:
        """Write atomically in the layout above."""
        cloud = PointCloudSet(showers.conditions, showers.hits, showers.offsets, self._attrs(showers.attrs))
        write_point_clouds(path, cloud, CONDITION_KEYS, detector_name=self.name)

    def write_stream(self, path: Path, batches: Iterable[PointCloudSet], attrs: dict[str, Any] | None = None) -> int:
        """Write batches as they come (memory: one batch); returns the number of events."""
        return write_point_cloud_stream(path, batches, CONDITION_KEYS, detector_name=self.name,
                                        attrs=self._attrs(attrs))
