"""HGCal point-cloud files: calotune's flat-hits layout, read through the checked path.

Layout (:mod:`calotune.pointclouds`): ``incident_energies`` (N, 1) MeV, ``hits`` (H, 4)
float32 ``[x, y, z]`` mm and ``E`` MeV, ``offsets`` (N + 1,) int64; attributes
``detector = "hgcal"``, ``shower_kind = "points"``, ``hit_columns`` and ``geometry`` (JSON
of :class:`HGCalGeometry`), all optional on read. A file may hold at most one hit per cell
of the geometry per event (a readout has no more), which bounds what a corrupt offset can
make a reader allocate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calotune.pointclouds import (
    PointCloudSet,
    read_point_cloud_conditions,
    read_point_clouds,
    write_point_cloud_stream,
)

if TYPE_CHECKING:
    from calotune.detectors.hgcal.geometry import HGCalGeometry

__all__ = ["CONDITION_KEYS", "HGCalFiles"]

log = logging.getLogger("calotune.detectors.hgcal")

#: PointCloudSet condition -> HDF5 key (the CaloChallenge name for the incident energy).
CONDITION_KEYS: dict[str, str] = {"energy": "incident_energies"}


class HGCalFiles:
    """File I/O of :class:`~calotune.detectors.hgcal.HGCal` (a mixin: it needs ``geometry``,
    ``name`` and ``geometry_dict()``)."""

    geometry: HGCalGeometry
    name: str

    def geometry_dict(self) -> dict[str, Any]:  # provided by the detector
        raise NotImplementedError

    def _warn_geometry(self, path: Path, attrs: dict[str, Any]) -> None:
        """Warn once per read when the file says it was written for another geometry."""
        try:
            theirs = json.loads(str(attrs.get("geometry", "{}")))
        except (json.JSONDecodeError, RecursionError):
            log.warning("%s: attribute 'geometry' is not JSON; ignoring it", path)
            return
        ours = self.geometry_dict()
        if isinstance(theirs, dict):
            diff = {k: v for k, v in theirs.items() if k in ours and v != ours[k]}
            if diff:
                log.warning("%s: written with another hgcal geometry (%s); hits are read as they are "
                            "and voxelised onto this one", path, ", ".join(f"{k}={v!r}" for k, v in diff.items()))

    def read(self, path: Path, max_events: int | None = None) -> PointCloudSet:
        """Read and check an hgcal point-cloud file (every check of
        :func:`calotune.pointclouds.read_point_clouds`); UserError naming file and key."""
        path = Path(path)
        cloud = read_point_clouds(path, CONDITION_KEYS, max_events, detector_name=self.name,
                                  max_hits_per_event=self.geometry.n_cells)
        self._warn_geometry(path, cloud.attrs)
        return cloud

    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the incident energies, after checking the file's keys (hits unread)."""
        return read_point_cloud_conditions(Path(path), CONDITION_KEYS, max_events, detector_name=self.name)

    def _attrs(self, attrs: dict[str, Any] | None) -> dict[str, Any]:
        return {**(attrs or {}), "geometry": json.dumps(self.geometry_dict(), sort_keys=True)}

    def write(self, path: Path, showers: PointCloudSet) -> None:
        """Write ``showers`` atomically (the file appears only when complete)."""
        write_point_cloud_stream(Path(path), [showers], CONDITION_KEYS, self.name, self._attrs(showers.attrs))

    def write_stream(self, path: Path, batches: Iterable[PointCloudSet], attrs: dict[str, Any] | None = None) -> int:
        """Write batches as they come (memory: one batch); returns the number of events."""
        return write_point_cloud_stream(Path(path), batches, CONDITION_KEYS, self.name, self._attrs(attrs))
