"""CaloChallenge HDF5 files, read unchanged in their own dtype through calotune.data.hdf5.

``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), MeV, gzip-compressed, float64
as the challenge's files (the official float64 classifier refuses float32 input).
"""

from __future__ import annotations

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
from calotune.detectors.calochallenge.geometry import DATASET_WIDTHS
from calotune.errors import UserError
from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.detectors.calochallenge.geometry import CaloChallengeGeometry

__all__ = ["CaloChallengeFiles"]


class CaloChallengeFiles:
    """File I/O of :class:`~calotune.detectors.calochallenge.CaloChallenge` (a mixin: it
    needs ``geometry`` and ``name``)."""

    geometry: CaloChallengeGeometry
    name: str

    def _width_text(self, width: int) -> str:
        """Completes "key 'showers' has W voxels per event but ...", naming a dataset of that width."""
        g = self.geometry
        others = [d for d, w in DATASET_WIDTHS.items() if w == width and d != g.dataset]
        hint = f"; that is the width of dataset {others[0]}" if others else ""
        return (
            f"dataset {g.dataset} ({self.name}) expects {g.n_voxels} voxels per event{hint}. Check --dataset "
            f"(widths: {', '.join(f'{d}: {w}' for d, w in DATASET_WIDTHS.items())})"
        )

    def _open_layout(self, handle: Any, path: Path) -> dict[str, Any]:
        """Check keys and the 'detector' attribute of an open file; return the attributes."""
        require_keys(handle, path, ("incident_energies", "showers"),
                     f"a CaloChallenge dataset {self.geometry.dataset} file")
        attrs = read_attrs(handle, path)
        written_for = attrs.get("detector")
        if written_for is not None and written_for != self.name:
            raise UserError(
                f"{path}: attribute 'detector' is {written_for!r}, but it is being read "
                f"as {self.name}; pass the matching --dataset"
            )
        return attrs

    _ENERGY = {"width": 1, "unit": "values", "layout": "it must have 1 (shape (N, 1))"}  # noqa: RUF012

    def read(self, path: Path, max_events: int | None = None) -> ShowerSet:
        """Read a CaloChallenge HDF5 file (real or calotune-written) without altering it.

        Validates keys, links, dtypes, shapes, widths, event counts, declared vs stored
        size, finiteness and non-negativity through :mod:`calotune.data.hdf5` (the path
        every reader shares), and raises :class:`UserError` naming the file and key.
        ``max_events`` reads only the first N events (useful for ds3, whose files are tens
        of GB); rows are read in blocks, so memory is the result plus one block.
        """
        path = Path(path)
        g = self.geometry
        if max_events is not None and max_events < 1:
            raise UserError(f"{path}: no events to read (max_events={max_events})")
        with open_checked(path) as handle:
            attrs = self._open_layout(handle, path)
            _, (n_declared, _) = check_dataset(handle, "incident_energies", path, **self._ENERGY)
            rows = {"n_events": n_declared, "events_key": "incident_energies"}
            check_dataset(handle, "showers", path, width=g.n_voxels, layout=self._width_text,
                          unit="voxels", **rows)
            # the file's own dtype (float64 in the challenge's files): the official evaluation
            # does its sums and bin edges in it, and so must calotune to give its numbers
            energy = read_dataset(handle, "incident_energies", path, strict=True, keep_dtype=True,
                                  max_rows=max_events, **self._ENERGY)[:, 0]
            showers = read_dataset(handle, "showers", path, width=g.n_voxels, keep_dtype=True,
                                   layout=self._width_text, unit="voxels", max_rows=max_events,
                                   **rows)
        attrs.update(detector=self.name, source=str(path))
        return ShowerSet(conditions={"energy": energy}, cells={"showers": showers}, attrs=attrs)

    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the incident energies, after checking the whole layout (cells unread)."""
        path = Path(path)
        with open_checked(path) as handle:
            self._open_layout(handle, path)
            _, (n_declared, _) = check_dataset(handle, "incident_energies", path, **self._ENERGY)
            check_dataset(handle, "showers", path, width=self.geometry.n_voxels,
                          layout=self._width_text, unit="voxels", n_events=n_declared,
                          events_key="incident_energies")
            energy = read_dataset(handle, "incident_energies", path, strict=True, keep_dtype=True,
                                  max_rows=max_events, **self._ENERGY)[:, 0]
        return {"energy": energy}

    def _datasets(self, showers: ShowerSet, path: Path) -> dict[str, np.ndarray]:
        g = self.geometry
        cells = showers.cells.get("showers")
        if cells is None or cells.ndim != 2 or cells.shape[1] != g.n_voxels:
            got = None if cells is None else cells.shape
            raise UserError(f"{self.name}.write({path}): ShowerSet cells['showers'] must be "
                            f"(N, {g.n_voxels}), got {got}")
        # float64, as the challenge's files: the official classifier's float64 network refuses
        # float32 input ("mat1 and mat2 must have the same dtype")
        energy = np.asarray(showers.conditions["energy"], dtype=np.float64).reshape(-1, 1)
        return {"incident_energies": energy, "showers": np.asarray(cells, dtype=np.float64)}

    def write(self, path: Path, showers: ShowerSet) -> None:
        """Write the exact CaloChallenge layout (gzip), atomically (tmp file + rename).

        An interrupted or failed write never leaves a truncated file under the final
        name, so a later ``read`` can trust any file it finds
        (:func:`calotune.data.hdf5.atomic_write`, which also turns a full disk into a
        UserError naming the file).
        """
        path = Path(path)
        atomic_write(path, self._datasets(showers, path), {**showers.attrs, "detector": self.name})

    def write_stream(self, path: Path, batches: Iterable[ShowerSet],
                     attrs: dict[str, Any] | None = None) -> int:
        """Write showers batch by batch into one file in the layout :meth:`write` produces;
        memory is one batch, and the file appears only when complete. Returns the count."""
        path = Path(path)
        with StreamWriter(path, {**(attrs or {}), "detector": self.name}) as writer:
            for batch in batches:
                writer.append(self._datasets(batch, path))
        return writer.rows
