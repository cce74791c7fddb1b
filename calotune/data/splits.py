"""Deterministic train / validation / test splits of one reference sample.

The test split is held out from every trial: the search selects on validation, and only
the post-search comparison (best vs default) and promotion look at test, so the number a
user is shown was never optimised against.

A search's sample can be most of the machine's memory (CaloChallenge dataset 3 is 16 GB
in float32), so :func:`split` can cut it without a second copy: ``in_place=True``
reorders the rows of the read arrays into ``[train | validation | test]`` and returns
three views. The events and their order inside each split are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calotune.showers import ShowerSet


@dataclass
class Splits:
    """Three disjoint subsets of a reference sample."""

    train: ShowerSet
    validation: ShowerSet
    test: ShowerSet


def split_order(n: int, validation_fraction: float, test_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted event indices of (train, validation, test): the one rule every caller shares."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * validation_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} events are too few to split into train/validation/test")
    return np.sort(order[n_val + n_test :]), np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_test])


def split(
    showers: ShowerSet, validation_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
    *, in_place: bool = False,
) -> Splits:
    """Shuffle with a fixed seed and cut; the same file and seed give the same splits.

    ``in_place``: permute ``showers``' arrays in place (consuming it: do not use it
    afterwards) and return views into them, so memory stays one copy of the sample
    instead of two. Only a :class:`ShowerSet` of writeable C-contiguous arrays can be
    reordered; any other sample (a point cloud's ragged hits) is split by copying.
    """
    train, val, test = split_order(len(showers), validation_fraction, test_fraction, seed)
    if in_place and _reorderable(showers):
        source = np.concatenate([train, val, test])
        for arrays in (showers.conditions, showers.cells):
            for key, array in arrays.items():
                arrays[key] = permute_rows(array, source)
        a, b = len(train), len(train) + len(val)
        return Splits(train=showers.subset(slice(0, a)), validation=showers.subset(slice(a, b)),
                      test=showers.subset(slice(b, None)))
    return Splits(train=showers.subset(train), validation=showers.subset(val), test=showers.subset(test))


def _reorderable(showers: object) -> bool:
    if type(showers) is not ShowerSet:
        return False
    arrays = [*showers.conditions.values(), *showers.cells.values()]
    return all(isinstance(a, np.ndarray) and a.flags.writeable for a in arrays)


#: Arrays of fewer bytes are reordered by one fancy-indexing copy: it is faster and the
#: copy is negligible next to the cells.
COPY_BELOW_BYTES = 64 << 20


def permute_rows(array: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``array[source]`` for a permutation ``source``, computed in place for large arrays.

    Follows the permutation's cycles, moving one row at a time through a one-row buffer:
    extra memory is one row, and each row is copied once (plus once per cycle). A
    non-contiguous or small array is returned as the fancy-indexing copy.
    """
    if array.nbytes < COPY_BELOW_BYTES or not array.flags.c_contiguous or not array.flags.writeable:
        return array[source]
    n = len(source)
    done = np.zeros(n, dtype=bool)
    rows = array.reshape(n, -1)
    buffer = np.empty_like(rows[0])
    for start in range(n):
        if done[start] or source[start] == start:
            done[start] = True
            continue
        # out[i] = in[source[i]]: walk i -> source[i] until the cycle closes at start
        buffer[...] = rows[start]
        i = start
        while True:
            done[i] = True
            j = int(source[i])
            if j == start:
                rows[i] = buffer
                break
            rows[i] = rows[j]
            i = j
    return array


def detach(showers: ShowerSet) -> ShowerSet:
    """A copy that owns its arrays: a view of a split would keep the whole sample alive.

    Any other sample type (a point cloud's ``subset`` copies its hits) is copied by index.
    """
    if type(showers) is not ShowerSet:
        return showers.subset(np.arange(len(showers)))
    return ShowerSet(conditions={k: np.array(v) for k, v in showers.conditions.items()},
                     cells={k: np.array(v) for k, v in showers.cells.items()}, attrs=dict(showers.attrs))


def empty_like(showers: ShowerSet) -> ShowerSet:
    """No events, same keys, widths and dtypes, sharing no memory with ``showers``."""
    if type(showers) is not ShowerSet:
        return showers.subset(np.arange(0))
    return ShowerSet(conditions={k: np.empty((0, *v.shape[1:]), v.dtype) for k, v in showers.conditions.items()},
                     cells={k: np.empty((0, *v.shape[1:]), v.dtype) for k, v in showers.cells.items()},
                     attrs=dict(showers.attrs))


def validation_subset(showers: ShowerSet, n_events: int | None, seed: int) -> ShowerSet:
    """At most ``n_events`` of the validation split, a fixed random subset in file order.

    The same events every epoch and every trial of a search (the seed is the search's),
    so trials are compared on one sample. Random rather than the first N: a file sorted
    by energy would otherwise give a biased sample. All of it when it is small enough.
    """
    n = len(showers)
    if n_events is None or n <= n_events:
        return showers
    keep = np.sort(np.random.default_rng(seed + 7919).choice(n, size=n_events, replace=False))
    return showers.subset(keep)
