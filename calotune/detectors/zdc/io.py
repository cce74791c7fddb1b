"""ZDC HDF5 files: the documented layout, read through calotune.data.hdf5's checked path.

Layout (one row per event): ``incident_energies`` (N, 1) MeV, ``incident_theta`` (N, 1)
rad, ``incident_phi`` (N, 1) rad, ``ecal`` (N, n_ecal) with flat index ``ix * ecal_ny + iy``,
``hcal`` (N, n_hcal) with ``reshape(N, nz, nx, ny)``; attributes ``detector``, ``particle``
and ``geometry`` (JSON of :class:`ZDCGeometry`), all optional on read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calotune.data.hdf5 import (
    StreamWriter,
    atomic_write,
    check_dataset,
    open_checked,
    read_attrs,
    read_dataset,
    require_keys,
)
from calotune.errors import UserError
from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.detectors.zdc.geometry import ZDCGeometry

__all__ = ["CONDITION_KEYS", "ZDCFiles"]

log = logging.getLogger("calotune.detectors.zdc")

#: ShowerSet condition -> HDF5 key.
CONDITION_KEYS: dict[str, str] = {
    "energy": "incident_energies",
    "theta": "incident_theta",
    "phi": "incident_phi",
}


class ZDCFiles:
    """File I/O of :class:`~calotune.detectors.zdc.ZDC` (a mixin: it needs ``geometry``,
    ``name``, ``parts``, ``part_sizes``, ``condition_keys`` and ``geometry_dict()``)."""

    geometry: ZDCGeometry
    name: str
    parts: tuple[str, ...]
    condition_keys: dict[str, str]
    part_sizes: dict[str, int]

    def geometry_dict(self) -> dict[str, Any]:  # provided by the detector
        raise NotImplementedError

    def _geometry_diff(self, path: Path, attrs: dict[str, Any]) -> str:
        """The fields where the file's 'geometry' attribute disagrees with ours, as text."""
        try:
            theirs = json.loads(str(attrs.get("geometry", "{}")))
        except (json.JSONDecodeError, RecursionError):
            log.warning("%s: attribute 'geometry' is not JSON; ignoring it", path)
            return ""
        ours = self.geometry_dict()
        diff = {k: v for k, v in theirs.items() if k in ours and v != ours[k]} if isinstance(theirs, dict) else {}
        return ", ".join(f"{k}={v!r}" for k, v in diff.items())

    def _layouts(self, diff: str) -> dict[str, str]:
        """Width-error wording per part, pointing at the file's own geometry if it differs."""
        g = self.geometry
        hint = f"; the file's 'geometry' attribute has {diff}" if diff else ""
        return {
            "ecal": f"the zdc geometry has {g.n_ecal} ({g.ecal_nx} x {g.ecal_ny}){hint}",
            "hcal": f"the zdc geometry has {g.n_hcal} ({g.hcal_nx} x {g.hcal_ny} x {g.hcal_nz}){hint}",
        }

    def _open_layout(self, f: Any, path: Path) -> tuple[dict[str, Any], dict[str, str], str]:
        """Check keys and the 'detector' attribute of an open file; (attrs, layouts, diff)."""
        require_keys(f, path, [*self.condition_keys.values(), *self.parts], "a zdc file")
        attrs = read_attrs(f, path)
        owner = attrs.get("detector", self.name)
        if owner != self.name:
            raise UserError(
                f"{path}: attribute 'detector' is {owner!r} but this reader is "
                f"for 'zdc'; pass --detector {owner} or the right file"
            )
        diff = self._geometry_diff(path, attrs)
        return attrs, self._layouts(diff), diff

    def _read_conditions(self, f: Any, path: Path, max_events: int | None) -> tuple[dict[str, np.ndarray], dict]:
        """The condition datasets (first ``max_events`` rows) and the row-count check for the rest."""
        one = {"width": 1, "unit": "values", "layout": "it must have 1 (shape (N, 1))"}
        _, (n_declared, _) = check_dataset(f, "incident_energies", path, **one)
        energy = read_dataset(f, "incident_energies", path, strict=True, max_rows=max_events, **one)[:, 0]
        rows = {"n_events": n_declared, "events_key": "incident_energies"}
        conditions = {"energy": energy}
        for cond in ("theta", "phi"):
            key = self.condition_keys[cond]
            conditions[cond] = read_dataset(f, key, path, minimum=None, max_rows=max_events, **one, **rows)[:, 0]
        return conditions, rows

    def read(self, path: Path, max_events: int | None = None) -> ShowerSet:
        """Read and check a zdc file (every check in :mod:`calotune.data.hdf5`).

        ``max_events`` reads only the first N events, so a large file can be sampled
        without loading it whole.
        """
        path = Path(path)
        with open_checked(path) as f:
            attrs, layouts, diff = self._open_layout(f, path)
            conditions, rows = self._read_conditions(f, path, max_events)
            cells = {
                part: read_dataset(
                    f, part, path, width=self.part_sizes[part], layout=layouts[part], max_rows=max_events, **rows
                )
                for part in self.parts
            }
        if diff:
            log.warning(
                "%s: written with another zdc geometry (%s); the cell counts match, so it is read with this one",
                path,
                diff,
            )
        return ShowerSet(conditions=conditions, cells=cells, attrs=attrs)

    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the per-event conditions of a zdc file, after checking its whole layout.

        Generation from a reference's conditions needs no cells; skipping them keeps
        memory at a few bytes per event however large the reference is.
        """
        path = Path(path)
        with open_checked(path) as f:
            _, layouts, _ = self._open_layout(f, path)
            conditions, rows = self._read_conditions(f, path, max_events)
            for part in self.parts:
                check_dataset(f, part, path, width=self.part_sizes[part], layout=layouts[part], **rows)
        return conditions

    def _datasets(self, showers: ShowerSet) -> dict[str, np.ndarray]:
        """The HDF5 datasets of ``showers`` in the documented layout, checked."""
        n = len(showers)
        datasets: dict[str, np.ndarray] = {}
        for cond, key in self.condition_keys.items():
            if cond not in showers.conditions:
                raise ValueError(f"zdc write: ShowerSet lacks condition {cond!r}")
            datasets[key] = np.asarray(showers.conditions[cond], np.float32).reshape(n, 1)
        for part, width in self.part_sizes.items():
            cells = np.asarray(showers.cells.get(part, np.empty((0, 0))), np.float32)
            if cells.shape != (n, width):
                raise ValueError(f"zdc write: part {part!r} has shape {cells.shape}, expected {(n, width)}")
            if not np.isfinite(cells).all() or (cells < 0).any():
                raise ValueError(
                    f"zdc write: part {part!r} has NaN/Inf or negative cells; "
                    "clip generated showers at 0 before writing"
                )
            datasets[part] = cells
        return datasets

    def _file_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {**attrs, "detector": self.name, "geometry": json.dumps(self.geometry_dict(), sort_keys=True)}

    def write(self, path: Path, showers: ShowerSet) -> None:
        """Write ``showers`` atomically (UserError naming the file if the disk refuses)."""
        atomic_write(path, self._datasets(showers), self._file_attrs(showers.attrs))

    def write_stream(self, path: Path, batches: Iterable[ShowerSet], attrs: dict[str, Any] | None = None) -> int:
        """Write showers batch by batch into one file; memory is one batch. Returns the count.

        The file is the same layout :meth:`write` produces and :meth:`read` reads, and
        appears under ``path`` only once every batch is written.
        """
        with StreamWriter(path, self._file_attrs(dict(attrs or {}))) as writer:
            for batch in batches:
                writer.append(self._datasets(batch))
        return writer.rows
