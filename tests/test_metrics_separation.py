"""Separation power (arXiv 2009.03796 eq. 15) and reference-derived binning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calotune.metrics.separation import binning_from_reference, histogram, separation_power

EDGES = np.array([0.0, 1.0, 2.0, 3.0])


def test_hand_computed_value() -> None:
    # ref counts [2, 1, 1] -> p = [1/2, 1/4, 1/4]; gen counts [1, 3, 0] -> q = [1/4, 3/4, 0].
    # S^2 = 1/2 * [(1/4)^2/(3/4) + (1/2)^2/1 + (1/4)^2/(1/4)] = 1/2 * (1/12 + 1/4 + 1/4)
    #     = 7/24.
    ref = np.array([0.5, 0.5, 1.5, 2.5])
    gen = np.array([0.5, 1.5, 1.5, 1.5])
    assert separation_power(ref, gen, EDGES) == pytest.approx(7 / 24, rel=1e-12)


def test_bins_empty_in_both_are_skipped() -> None:
    # Same samples as above with an extra bin [3, 4) empty in both: still 7/24, no NaN.
    ref = np.array([0.5, 0.5, 1.5, 2.5])
    gen = np.array([0.5, 1.5, 1.5, 1.5])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert separation_power(ref, gen, edges) == pytest.approx(7 / 24, rel=1e-12)


def test_normalisation_makes_sample_size_irrelevant() -> None:
    # gen is ref repeated 5 times: identical normalised histograms, different counts.
    ref = np.array([0.5, 0.5, 1.5, 2.5])
    assert separation_power(ref, np.tile(ref, 5), EDGES) == 0.0


def test_identical_samples_give_zero() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    assert separation_power(x, x.copy(), binning_from_reference(x, 30)) == 0.0


def test_disjoint_supports_give_one() -> None:
    ref = np.array([0.1, 0.2, 0.9])
    gen = np.array([2.1, 2.5, 2.9])
    assert separation_power(ref, gen, EDGES) == pytest.approx(1.0, abs=1e-15)


def test_out_of_range_dropped_by_default_counted_with_overflow() -> None:
    ref = np.array([0.5, 1.5])
    gen = np.array([0.5, 1.5, 10.0, -3.0, np.nan])
    # Default (CaloChallenge / np.histogram): 10, -3 and NaN are dropped -> identical.
    assert separation_power(ref, gen, EDGES) == 0.0
    # overflow: gen counts [2 (0.5 and -3), 1, 2 (10 and NaN)] -> q = [2/5, 1/5, 2/5],
    # p = [1/2, 1/2, 0]: 1/2 * [(1/10)^2/(9/10) + (3/10)^2/(7/10) + (2/5)^2/(2/5)]
    #   = 1/2 * (1/90 + 9/70 + 2/5).
    expected = 0.5 * (1 / 90 + 9 / 70 + 2 / 5)
    assert separation_power(ref, gen, EDGES, overflow=True) == pytest.approx(expected)


def test_histogram_overflow_policy() -> None:
    values = np.array([-1.0, 0.5, 3.0, 7.0, np.inf, -np.inf, np.nan])
    assert histogram(values, EDGES).tolist() == [1.0, 0.0, 1.0]  # 3.0 is in the last bin
    assert histogram(values, EDGES, overflow=True).tolist() == [3.0, 0.0, 4.0]


def test_empty_histograms() -> None:
    inside = np.array([0.5, 1.5])
    outside = np.array([5.0, 6.0])
    assert separation_power(outside, outside, EDGES) == 0.0
    assert separation_power(inside, outside, EDGES) == 1.0
    assert separation_power(outside, inside, EDGES) == 1.0
    assert separation_power(inside, np.array([]), EDGES) == 1.0


def test_integer_bins_span_both_samples() -> None:
    # 2 bins over [0, 4]: ref -> [1, 0], gen -> [1/2, 1/2]:
    # 1/2 * [(1/2)^2/(3/2) + (1/2)^2/(1/2)] = 1/2 * (1/6 + 1/2) = 1/3.
    ref = np.array([0.0, 1.0])
    gen = np.array([1.0, 4.0])
    assert separation_power(ref, gen, 2) == pytest.approx(1 / 3)
    assert separation_power(gen, ref, 2) == pytest.approx(1 / 3)


def test_bad_bins_rejected() -> None:
    with pytest.raises(ValueError, match="increasing"):
        separation_power(np.ones(3), np.ones(3), np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        separation_power(np.ones(3), np.ones(3), 0)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float64, st.integers(1, 40), elements=finite),
    b=arrays(np.float64, st.integers(1, 40), elements=finite),
    n_bins=st.integers(1, 20),
    overflow=st.booleans(),
)
def test_symmetric_and_bounded(a: np.ndarray, b: np.ndarray, n_bins: int, overflow: bool) -> None:
    edges = binning_from_reference(np.concatenate([a, b]), n_bins)
    s_ab = separation_power(a, b, edges, overflow=overflow)
    s_ba = separation_power(b, a, edges, overflow=overflow)
    assert isinstance(s_ab, float)
    assert 0.0 <= s_ab <= 1.0
    assert s_ab == pytest.approx(s_ba, abs=1e-12)


def test_binning_linear_covers_quantile_range() -> None:
    x = np.arange(101, dtype=float)
    edges = binning_from_reference(x, 10)
    assert edges.shape == (11,)
    assert edges[0] == 0.0 and edges[-1] == 100.0
    assert np.all(np.diff(edges) > 0)
    trimmed = binning_from_reference(x, 10, quantiles=(0.1, 0.9))
    assert trimmed[0] == pytest.approx(10.0) and trimmed[-1] == pytest.approx(90.0)


def test_binning_log_uses_positive_values() -> None:
    x = np.array([0.0, -1.0, 1.0, 10.0, 1000.0, np.nan])
    edges = binning_from_reference(x, 3, log=True)
    np.testing.assert_allclose(edges, [1.0, 10.0, 100.0, 1000.0])


def test_binning_degenerate_reference_is_widened() -> None:
    edges = binning_from_reference(np.zeros(50), 4)
    assert edges[0] < 0.0 < edges[-1] and np.all(np.diff(edges) > 0)
    # log requested but nothing positive: linear fallback, still usable.
    assert np.all(np.diff(binning_from_reference(np.zeros(5), 4, log=True)) > 0)
    log_const = binning_from_reference(np.full(5, 100.0), 2, log=True)
    assert log_const[0] < 100.0 < log_const[-1]
    # A constant reference vs. a shifted constant is fully separated.
    assert separation_power(np.zeros(5), np.ones(5), edges, overflow=True) == 1.0


def test_binning_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        binning_from_reference(np.array([np.nan, np.inf]))
    with pytest.raises(ValueError, match="n_bins"):
        binning_from_reference(np.ones(3), 0)
    with pytest.raises(ValueError, match="quantiles"):
        binning_from_reference(np.ones(3), 5, quantiles=(0.9, 0.1))
