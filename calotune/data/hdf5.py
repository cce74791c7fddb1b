"""Checked HDF5 reading and atomic HDF5 writing shared by every detector's file layout.

Detectors differ in their keys and widths (ZDC: ``ecal``/``hcal``; CaloChallenge:
``showers``), but the failure modes of a user's file are the same everywhere: missing,
not HDF5, a key absent, the wrong width, integers or strings, NaN, negative energies,
rows that do not line up. Checking them here once gives every reader the same one-line
:class:`~calotune.errors.UserError` naming the file, the key, the rule and the fix,
instead of a numpy traceback three calls later inside a training loop.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: The attribute value types an HDF5 attribute written by calotune may hold.
AttrValue = str | int | float


def open_checked(path: Path | str) -> h5py.File:
    """Open ``path`` read-only, turning "no such file" and "not HDF5" into UserError.

    h5py's own errors ("unable to synchronously open file (file signature not found)")
    do not tell a user which of their flags to change; these messages do.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: file not found (looked in {path.resolve().parent}); "
            "check the path, or create it with `python -m calotune.data synth`"
        )
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an HDF5 file; pass the .h5 file inside it")
    if not h5py.is_hdf5(path):
        raise UserError(
            f"{path}: not an HDF5 file (no HDF5 signature); pass a file written with h5py in the documented layout"
        )
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: cannot be opened as HDF5 ({exc}); is it truncated?") from None


def require_keys(file: h5py.File, path: Path | str, expected: Iterable[str], layout: str) -> None:
    """Refuse a file that lacks any of ``expected``, listing what it needs and what it has.

    ``layout`` names the layout in the message (e.g. "a zdc file").
    """
    expected = list(expected)
    missing = [k for k in expected if k not in file]
    if missing:
        found = ", ".join(sorted(file.keys())) or "nothing"
        raise UserError(
            f"{path}: key {missing[0]!r} is missing; {layout} needs the datasets "
            f"{', '.join(expected)} (found: {found}); write the file in that layout or pass "
            "the right --detector"
        )


def read_dataset(
    file: h5py.File,
    key: str,
    path: Path | str,
    *,
    width: int,
    layout: str,
    n_events: int | None = None,
    events_key: str | None = None,
    minimum: float | None = 0.0,
    strict: bool = False,
    unit: str = "cells",
) -> np.ndarray:
    """Read ``file[key]`` as a float32 (N, width) array after checking everything about it.

    Args:
        width: the number of values per event the detector's geometry implies.
        layout: what the geometry says, completing "... but <layout>", e.g.
            "the zdc geometry has 3600 (10 x 10 x 36)".
        n_events, events_key: the row count the other datasets have and the key it came
            from, so a mismatch names both.
        minimum, strict: every value must be >= minimum (> minimum when ``strict``);
            None skips the check (angles may be negative).
        unit: what one column is called in messages ("cells", "values").

    A (N,) dataset is accepted where width is 1, because several public files store
    per-event conditions flat.
    """
    where = f"{path}: key {key!r}"
    obj = file[key]
    if not isinstance(obj, h5py.Dataset):
        raise UserError(f"{where} is an HDF5 group, not a dataset; store a (N, {width}) array")
    if obj.dtype.kind != "f":
        raise UserError(
            f"{where} has dtype {obj.dtype} but must be floating point (float32 or float64); "
            "write it with .astype('float32')"
        )
    shape = obj.shape
    if len(shape) == 1 and width == 1:
        shape = (shape[0], 1)
    if len(shape) != 2:
        raise UserError(
            f"{where} has shape {obj.shape} but must be 2-D (N, {width}); "
            "flatten each event in the documented cell order"
        )
    if shape[1] != width:
        raise UserError(
            f"{where} has {shape[1]} {unit} per event but {layout}; pass the matching geometry or the right file"
        )
    if n_events is not None and shape[0] != n_events:
        other = f" but {events_key!r} has {n_events}" if events_key else f" but expected {n_events}"
        raise UserError(f"{where} has {shape[0]} events{other}; every dataset needs one row per event")
    if shape[0] == 0:
        raise UserError(f"{where} has 0 events; a sample needs at least one")
    data = np.asarray(obj[()], dtype=np.float32).reshape(shape)
    _check_values(data, where, minimum, strict)
    return data


def _check_values(data: np.ndarray, where: str, minimum: float | None, strict: bool) -> None:
    """Raise on the first non-finite or out-of-range value, saying how many and where."""
    bad = ~np.isfinite(data)
    if bad.any():
        event, col = np.argwhere(bad)[0]
        raise UserError(
            f"{where} has {int(bad.sum())} NaN/Inf values, the first at event {event}, "
            f"column {col}; fix or drop those events"
        )
    if minimum is None:
        return
    bad = data <= minimum if strict else data < minimum
    if bad.any():
        event, col = np.argwhere(bad)[0]
        if strict:
            what, fix = f"values <= {minimum:g}", f"every value must be > {minimum:g} MeV; drop those events"
        else:
            what = "negative values" if minimum == 0 else f"values < {minimum:g}"
            fix = f"energies must be >= {minimum:g} MeV; clip them when writing"
        raise UserError(
            f"{where} has {int(bad.sum())} {what}, the first {data[event, col]:g} at event {event}, column {col}; {fix}"
        )


def read_attrs(file: h5py.File) -> dict[str, AttrValue]:
    """File attributes as plain Python scalars (h5py hands back numpy scalars and bytes)."""
    out: dict[str, AttrValue] = {}
    for k, v in file.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            out[k] = v
        else:
            log.debug("skipping non-scalar HDF5 attribute %r", k)
    return out


def atomic_write(
    path: Path | str,
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, AttrValue] | None = None,
    *,
    compression_level: int = 4,
) -> None:
    """Write gzip-compressed datasets and attributes to ``path`` all-or-nothing.

    The data goes to a hidden temporary file in the same folder, then ``os.replace``
    renames it over ``path``: rename is atomic on one filesystem, so a crash, a Ctrl-C or
    two workers writing the same cache file never leave a half-written HDF5 that a later
    read would trip over.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random token: unique per writer; not mkstemp, whose 0600 mode would survive
    # the rename and hide a shared cache file from other users.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in datasets.items():
                f.create_dataset(key, data=value, compression="gzip", compression_opts=compression_level)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.debug("wrote %s", path)
