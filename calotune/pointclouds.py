"""Point clouds: showers as variable-length sets of hits (x, y, z, E), a first-class shower kind.

Point-cloud generators (score-based diffusion transformers on hits, e.g. the CaloClouds
and tdsm_encoder line of work; autoregressive transformers over energy-sorted cells)
produce a different number of hits per shower. :class:`PointCloudSet` is their in-memory
sample; :func:`voxelise` puts a sample on a detector's grid, so every grid metric (the
CaloChallenge evaluation, arXiv 2410.21611; the ZDC features) applies unchanged, and a
grid detector's ``to_point_cloud`` turns voxels back into hits (one per non-zero cell, at
its centre), so ``voxelise(to_point_cloud(showers))`` is the identity on cell energies.

Units: x, y, z in mm, E in MeV. z is the depth from the detector's front face.

HDF5 layout (CSR, "flat hits + offsets")::

    incident_energies   (N, 1)      float   MeV         (other conditions: their detector's keys)
    hits                (H, 4)      float32 x, y, z [mm], E [MeV]; event i's hits in rows
    offsets             (N + 1,)    int64   offsets[i]:offsets[i + 1]; 0 first, H last
    attrs: detector, shower_kind = "points", hit_columns = "x,y,z,E"

Why flat + offsets rather than padded (N, max_hits, 4) + counts: hit counts range from a
handful to tens of thousands per shower (a 1 GeV and a 1 TeV electron in CaloChallenge
dataset 3, 40,500 cells), so a padded file is mostly zeros sized by its largest shower,
and one large shower appended to a stream would force every earlier row to grow. Flat
hits cost exactly what they hold, append batch by batch with a bounded memory (the
stream writer grows ``hits`` and ``offsets`` independently), and read a prefix of
events as a prefix of both datasets. Offsets (not counts) make any event's rows one
slice, and their invariants (start at 0, non-decreasing, end at H) are checkable in a
single pass. Padding happens only per training batch, in :meth:`PointCloudSet.batch_arrays`,
sized by that batch's largest shower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calotune.errors import UserError
from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.detectors.base import Detector

__all__ = [
    "HIT_COLUMNS",
    "MAX_HITS_PER_EVENT",
    "PointCloudSet",
    "grid_to_point_cloud",
    "grid_voxelise",
    "read_point_cloud_conditions",
    "read_point_clouds",
    "to_point_cloud",
    "voxelise",
    "write_point_cloud_stream",
    "write_point_clouds",
]

#: The four columns of a hit.
HIT_COLUMNS: tuple[str, ...] = ("x", "y", "z", "E")
#: Largest shower a file may hold: a padded batch is B x max_hits x 16 bytes, so one
#: absurd event (a corrupt offset) must not decide the memory of training. 2^18 is six
#: times the largest CaloChallenge grid (40,500 cells of dataset 3).
MAX_HITS_PER_EVENT = 1 << 18
#: Default condition -> HDF5 key map (the CaloChallenge name for the incident energy).
ENERGY_KEYS: dict[str, str] = {"energy": "incident_energies"}


@dataclass
class PointCloudSet:
    """A sample of N showers as hits.

    conditions: name -> (N,) array, "energy" (incident energy, MeV) first, as in
        :class:`~calotune.showers.ShowerSet`.
    hits: (H, 4) float32 [x, y, z, E] in mm and MeV, all events back to back.
    offsets: (N + 1,) int64; event i is ``hits[offsets[i]:offsets[i + 1]]``.
    attrs: free-form provenance, written as HDF5 attributes.
    """

    conditions: dict[str, np.ndarray]
    hits: np.ndarray
    offsets: np.ndarray
    attrs: dict[str, str | int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "energy" not in self.conditions:
            raise ValueError("PointCloudSet.conditions must contain 'energy' (MeV)")
        if next(iter(self.conditions)) != "energy":
            self.conditions = {"energy": self.conditions["energy"],
                               **{k: v for k, v in self.conditions.items() if k != "energy"}}
        self.hits = np.asarray(self.hits, dtype=np.float32).reshape(-1, len(HIT_COLUMNS))
        self.offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        sizes = {len(v) for v in self.conditions.values()}
        if len(sizes) > 1:
            raise ValueError(f"PointCloudSet conditions disagree on the number of events: {sorted(sizes)}")
        n = sizes.pop()
        if len(self.offsets) != n + 1:
            raise ValueError(f"PointCloudSet.offsets has {len(self.offsets)} entries for {n} events (need N + 1)")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.hits) or (np.diff(self.offsets) < 0).any():
            raise ValueError("PointCloudSet.offsets must start at 0, never decrease and end at len(hits)")

    def __len__(self) -> int:
        return len(self.conditions["energy"])

    @property
    def counts(self) -> np.ndarray:
        """(N,) number of hits per event."""
        return np.diff(self.offsets)

    def event(self, i: int) -> np.ndarray:
        """(n_i, 4) hits of event ``i`` (a view)."""
        return self.hits[self.offsets[i] : self.offsets[i + 1]]

    def total_energy(self) -> np.ndarray:
        """(N,) summed hit energy per event, MeV (float64)."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.hits[:, 3], dtype=np.float64)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def _gather(self, indices: np.ndarray | slice | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(events, per-event counts, source rows in ``hits``) of the selection, vectorised."""
        events = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
        if events.dtype == bool:
            events = np.flatnonzero(events)
        events = events.astype(np.int64).reshape(-1)
        starts = self.offsets[events]
        counts = self.offsets[events + 1] - starts
        first = np.cumsum(counts) - counts
        rows = np.repeat(starts - first, counts) + np.arange(int(counts.sum()), dtype=np.int64)
        return events, counts, rows

    def subset(self, indices: np.ndarray | slice | Sequence[int]) -> PointCloudSet:
        """Events selected by an index array, a boolean mask or a slice (copies the hits)."""
        events, counts, rows = self._gather(indices)
        return PointCloudSet(
            conditions={k: v[events] for k, v in self.conditions.items()},
            hits=self.hits[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            attrs=dict(self.attrs),
        )

    def batch_arrays(self, indices: np.ndarray | slice | Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
        """A training batch: ``{"conditions": {name: (B,) float32}, "cells": {"hits": (B, M, 4)
        float32 zero-padded, "mask": (B, M) bool}}``, M the batch's largest hit count (>= 1,
        so attention over an all-empty batch still has a key). True in the mask = a real hit.
        """
        events, counts, rows = self._gather(indices)
        b, m = len(events), max(int(counts.max(initial=0)), 1)
        which = np.repeat(np.arange(b), counts)
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        hits = np.zeros((b, m, len(HIT_COLUMNS)), np.float32)
        mask = np.zeros((b, m), bool)
        hits[which, slot] = self.hits[rows]
        mask[which, slot] = True
        return {
            "conditions": {k: np.asarray(v[events], np.float32) for k, v in self.conditions.items()},
            "cells": {"hits": hits, "mask": mask},
        }

    @classmethod
    def from_events(
        cls, conditions: dict[str, np.ndarray], events: Iterable[np.ndarray], attrs: dict[str, Any] | None = None
    ) -> PointCloudSet:
        """Build from one (n_i, 4) array per event."""
        parts = [np.asarray(e, np.float32).reshape(-1, len(HIT_COLUMNS)) for e in events]
        counts = np.array([len(p) for p in parts], np.int64)
        hits = np.concatenate(parts) if parts else np.empty((0, len(HIT_COLUMNS)), np.float32)
        return cls(conditions, hits, np.concatenate([[0], np.cumsum(counts)]), dict(attrs or {}))


# --------------------------------------------------------------------------- grids


def grid_to_point_cloud(showers: ShowerSet, centres: Mapping[str, np.ndarray]) -> PointCloudSet:
    """One hit per non-zero cell, at the cell centre; parts in ``centres`` order, cells in
    file order within a part, so the hits of an event come in the detector's cell order.

    centres: part -> (n_cells, 3) cell-centre (x, y, z) in mm. The energies are stored as
    float32: exact for float32 showers (every synthetic and generated sample); float64 file
    values are rounded to float32.
    """
    n = len(showers)
    event_parts, hit_parts = [], []
    for part, xyz in centres.items():
        cells = np.asarray(showers.cells[part])
        if cells.shape != (n, len(xyz)):
            raise ValueError(f"part {part!r} has shape {cells.shape}, the grid has {len(xyz)} cells")
        event, cell = np.nonzero(cells)  # row-major: sorted by event, then cell
        event_parts.append(event)
        hit_parts.append(np.column_stack([np.asarray(xyz, np.float32)[cell], cells[event, cell].astype(np.float32)]))
    event = np.concatenate(event_parts) if event_parts else np.empty(0, np.int64)
    hits = np.concatenate(hit_parts) if hit_parts else np.empty((0, 4), np.float32)
    order = np.argsort(event, kind="stable")  # group by event, keep part order inside
    offsets = np.concatenate([[0], np.cumsum(np.bincount(event, minlength=n))])
    return PointCloudSet(
        conditions={k: np.asarray(v) for k, v in showers.conditions.items()},
        hits=hits[order],
        offsets=offsets,
        attrs={**showers.attrs, "shower_kind": "points"},
    )


#: locate(xyz (H, 3) float64 mm) -> (part position or -1 outside the grid, cell index).
Locator = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def grid_voxelise(cloud: PointCloudSet, part_sizes: Mapping[str, int], locate: Locator) -> ShowerSet:
    """Sum hit energies into the cells ``locate`` puts them in; hits outside the grid are
    dropped (the energy a real detector would not have seen: lateral or rear leakage).

    Sums run in float64 and are stored as float32, so one hit per cell gives back its
    energy bit for bit.
    """
    n = len(cloud)
    part, cell = locate(cloud.hits[:, :3].astype(np.float64))
    event = np.repeat(np.arange(n), cloud.counts)
    energy = cloud.hits[:, 3].astype(np.float64)
    cells: dict[str, np.ndarray] = {}
    for k, (name, width) in enumerate(part_sizes.items()):
        here = part == k
        flat = event[here] * width + cell[here]
        summed = np.bincount(flat, weights=energy[here], minlength=n * width)
        cells[name] = summed.reshape(n, width).astype(np.float32)
    attrs = {k: v for k, v in cloud.attrs.items() if k != "shower_kind"}
    return ShowerSet(conditions=dict(cloud.conditions), cells=cells, attrs=attrs)


def voxelise(cloud: PointCloudSet, detector: Detector) -> ShowerSet:
    """``detector.voxelise(cloud)``: the sample on the detector's grid, for its grid metrics."""
    return detector.voxelise(cloud)


def to_point_cloud(showers: ShowerSet, detector: Detector) -> PointCloudSet:
    """``detector.to_point_cloud(showers)``: one hit per non-zero cell at its centre."""
    return detector.to_point_cloud(showers)


# --------------------------------------------------------------------------- files


def _datasets(cloud: PointCloudSet, condition_keys: Mapping[str, str], path: Path, base: int
              ) -> dict[str, np.ndarray]:
    n = len(cloud)
    out: dict[str, np.ndarray] = {}
    for cond, key in condition_keys.items():
        if cond not in cloud.conditions:
            raise UserError(f"{path}: cannot write: the point clouds lack condition {cond!r}")
        out[key] = np.asarray(cloud.conditions[cond], np.float64 if cond == "energy" else np.float32).reshape(n, 1)
    hits = np.asarray(cloud.hits, np.float32)
    if not np.isfinite(hits).all() or (hits[:, 3] < 0).any():
        raise UserError(f"{path}: cannot write: hits hold NaN/Inf or negative energies; clip E at 0 first")
    out["hits"] = hits
    out["offsets"] = cloud.offsets[1:] + base
    return out


def _file_attrs(attrs: Mapping[str, Any], detector_name: str | None) -> dict[str, Any]:
    out = {**attrs, "shower_kind": "points", "hit_columns": ",".join(HIT_COLUMNS)}
    if detector_name is not None:
        out["detector"] = detector_name
    return out


def write_point_clouds(
    path: Path | str,
    cloud: PointCloudSet,
    condition_keys: Mapping[str, str] = ENERGY_KEYS,
    detector_name: str | None = None,
) -> None:
    """Write ``cloud`` in the module's layout, atomically (the file appears only when complete)."""
    write_point_cloud_stream(path, [cloud], condition_keys, detector_name, cloud.attrs)


def write_point_cloud_stream(
    path: Path | str,
    batches: Iterable[PointCloudSet],
    condition_keys: Mapping[str, str] = ENERGY_KEYS,
    detector_name: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> int:
    """Write batches as they come (memory: one batch) into one file; returns the event count.

    ``hits`` and ``offsets`` grow by their own row counts
    (:meth:`calotune.data.hdf5.StreamWriter.extend`); the file appears under ``path``
    only once every batch is written.
    """
    from calotune.data.hdf5 import StreamWriter

    path = Path(path)
    events = hits = 0
    with StreamWriter(path, _file_attrs(dict(attrs or {}), detector_name)) as writer:
        writer.extend({"offsets": np.zeros(1, np.int64), "hits": np.empty((0, len(HIT_COLUMNS)), np.float32)})
        for batch in batches:
            writer.extend(_datasets(batch, condition_keys, path, hits))
            events, hits = events + len(batch), hits + len(batch.hits)
    if events == 0:
        raise UserError(f"{path}: no events to write")
    return events


def _open_layout(f: Any, path: Path, condition_keys: Mapping[str, str], detector_name: str | None) -> dict[str, Any]:
    from calotune.data.hdf5 import read_attrs, require_keys

    require_keys(f, path, [*condition_keys.values(), "hits", "offsets"],
                 f"a point-cloud file{f' of {detector_name}' if detector_name else ''}")
    attrs = read_attrs(f, path, interpreted=("detector", "shower_kind"))
    owner = attrs.get("detector")
    if detector_name is not None and owner is not None and owner != detector_name:
        raise UserError(f"{path}: attribute 'detector' is {owner!r} but it is being read as {detector_name!r}; "
                        "pass the matching --detector")
    return attrs


def _read_conditions(f: Any, path: Path, condition_keys: Mapping[str, str], max_events: int | None
                     ) -> tuple[dict[str, np.ndarray], int]:
    from calotune.data.hdf5 import check_dataset, read_dataset

    one = {"width": 1, "unit": "values", "layout": "it must have 1 (shape (N, 1))"}
    energy_key = condition_keys["energy"]
    _, (n_declared, _) = check_dataset(f, energy_key, path, **one)
    rows = {"n_events": n_declared, "events_key": energy_key}
    conditions = {"energy": read_dataset(f, energy_key, path, strict=True, keep_dtype=True, max_rows=max_events,
                                         **one)[:, 0]}
    for cond, key in condition_keys.items():
        if cond != "energy":
            conditions[cond] = read_dataset(f, key, path, minimum=None, max_rows=max_events, **one, **rows)[:, 0]
    return conditions, n_declared


def _hits_dataset(f: Any, path: Path) -> tuple[Any, int]:
    """Check ``hits`` (any row count, 0 included) and return it with its row count."""
    from calotune.data.hdf5 import H5_ERRORS, check_dataset, get_dataset

    layout = "a hit has 4 values: x, y, z [mm], E [MeV]"
    obj = get_dataset(f, "hits", path)
    try:
        shape, dtype = obj.shape, obj.dtype
    except H5_ERRORS:
        shape, dtype = None, None
    if shape is not None and dtype is not None and dtype.kind == "f" and len(shape) == 2 and shape == (0, 4):
        return obj, 0
    _, (n_hits, _) = check_dataset(f, "hits", path, width=len(HIT_COLUMNS), layout=layout, unit="values")
    return obj, n_hits


def read_point_clouds(
    path: Path | str,
    condition_keys: Mapping[str, str] = ENERGY_KEYS,
    max_events: int | None = None,
    *,
    detector_name: str | None = None,
    max_hits_per_event: int = MAX_HITS_PER_EVENT,
) -> PointCloudSet:
    """Read and check a point-cloud file through :mod:`calotune.data.hdf5`'s checked path.

    Refused with a UserError naming the file and key: a missing key; conditions that are
    not (N, 1) floats, non-finite, or (energy) not positive; ``hits`` not (H, 4) float,
    non-finite, or with a negative E; ``offsets`` not (N + 1,) integers from 0,
    non-decreasing, ending at H; an event above ``max_hits_per_event`` hits; a read that
    would not fit in memory. ``max_events`` reads only the first events (a prefix of both
    ``offsets`` and ``hits``).
    """
    from calotune.data.hdf5 import open_checked, read_dataset, read_offsets

    path = Path(path)
    if max_events is not None and max_events < 1:
        raise UserError(f"{path}: no events to read (max_events={max_events})")
    with open_checked(path) as f:
        attrs = _open_layout(f, path, condition_keys, detector_name)
        conditions, n_declared = _read_conditions(f, path, condition_keys, max_events)
        _, n_hits = _hits_dataset(f, path)
        offsets = read_offsets(f, "offsets", path, n_events=n_declared, events_key=condition_keys["energy"],
                               n_items=n_hits, items_key="hits", max_events=max_events,
                               max_per_event=max_hits_per_event)
        keep = int(offsets[-1])
        if keep:
            hits = read_dataset(f, "hits", path, width=len(HIT_COLUMNS), layout="a hit has 4 values: x, y, z, E",
                                unit="values", minimum=None, max_rows=keep)
        else:
            hits = np.empty((0, len(HIT_COLUMNS)), np.float32)
    negative = hits[:, 3] < 0
    if negative.any():
        row = int(np.argmax(negative))
        event = int(np.searchsorted(offsets, row, side="right") - 1)
        raise UserError(f"{path}: key 'hits' has {int(negative.sum())} negative energies (column 3, E), the first "
                        f"{float(hits[row, 3]):g} at row {row} (event {event}); energies must be >= 0 MeV")
    return PointCloudSet(conditions=conditions, hits=hits, offsets=offsets, attrs=attrs)


def read_point_cloud_conditions(
    path: Path | str,
    condition_keys: Mapping[str, str] = ENERGY_KEYS,
    max_events: int | None = None,
    *,
    detector_name: str | None = None,
) -> dict[str, np.ndarray]:
    """Only the conditions of a point-cloud file, after checking its keys (hits unread)."""
    from calotune.data.hdf5 import open_checked

    path = Path(path)
    with open_checked(path) as f:
        _open_layout(f, path, condition_keys, detector_name)
        conditions, _ = _read_conditions(f, path, condition_keys, max_events)
        _hits_dataset(f, path)
    return conditions
