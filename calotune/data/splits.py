"""Deterministic train / validation / test splits of one reference sample.

The test split is held out from every trial: the search selects on validation, and only
the post-search comparison (best vs default) and promotion look at test, so the number a
user is shown was never optimised against.
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


def split(
    showers: ShowerSet, validation_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> Splits:
    """Shuffle with a fixed seed and cut; the same file and seed give the same splits."""
    n = len(showers)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * validation_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} events are too few to split into train/validation/test")
    return Splits(
        train=showers.subset(np.sort(order[n_val + n_test :])),
        validation=showers.subset(np.sort(order[:n_val])),
        test=showers.subset(np.sort(order[n_val : n_val + n_test])),
    )
