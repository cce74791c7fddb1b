"""Separation power between two one-dimensional distributions, and reference binning.

The separation power (also called the triangular discriminator) is the histogram metric
of the CaloGAN / CaloFlow literature and of the CaloChallenge 2022 evaluation:

    <S^2> = 1/2 * sum_i (h1_i - h2_i)^2 / (h1_i + h2_i),

with each histogram normalised to unit sum (arXiv 2009.03796, eq. 15; CaloChallenge 2022
community paper, arXiv 2410.21611). It is 0 for identical histograms and 1 for histograms
with disjoint support, which makes it a bounded, symmetric objective that can be averaged
over many features without one feature's units dominating.

It is deliberately generic (plain arrays in, a float out) because the ZDC scores and the
CaloChallenge high-level-feature suite share it.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["binning_from_reference", "histogram", "separation_power"]

logger = logging.getLogger(__name__)


def histogram(values: np.ndarray, edges: np.ndarray, *, overflow: bool = False) -> np.ndarray:
    """Raw counts of ``values`` in ``edges``, with an explicit out-of-range policy.

    Kept separate from :func:`separation_power` so that plots can draw exactly the
    histograms that were scored.

    overflow=False follows the CaloChallenge evaluation code, which calls ``np.histogram``:
    values outside [edges[0], edges[-1]] and non-finite values are dropped.
    overflow=True counts every value: values below the range and -inf go to the first bin,
    values above it, +inf and NaN to the last bin. Use it for search objectives, where
    dropping out-of-range mass would let a generator put arbitrary garbage outside the
    reference range without any penalty.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    e = np.asarray(edges, dtype=np.float64)
    if overflow:
        # NaN has no order; treat it as the worst kind of overflow (last bin).
        x = np.where(np.isnan(x), np.inf, x)
        x = np.clip(x, e[0], e[-1])
    else:
        x = x[np.isfinite(x)]
    counts, _ = np.histogram(x, bins=e)
    return counts.astype(np.float64)


def _edges(reference: np.ndarray, generated: np.ndarray, bins: np.ndarray | int) -> np.ndarray:
    """Bin edges: given explicitly, or ``bins`` equal-width bins over both samples.

    An integer spans the finite values of *both* samples so that nothing is out of range;
    this keeps the metric symmetric. For comparisons across trials use edges fixed from
    the reference (:func:`binning_from_reference`) instead.
    """
    if np.ndim(bins) == 0:
        n_bins = int(bins)  # type: ignore[arg-type]
        if n_bins < 1:
            raise ValueError(f"bins must be a positive integer or an edge array, got {bins!r}")
        both = np.concatenate([np.ravel(reference), np.ravel(generated)]).astype(np.float64)
        both = both[np.isfinite(both)]
        if both.size == 0:
            return np.array([0.0, 1.0])
        lo, hi = float(both.min()), float(both.max())
        lo, hi = _widen(lo, hi)
        return np.linspace(lo, hi, n_bins + 1)
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError("bin edges must be a 1-D, strictly increasing array of >= 2 values")
    return edges


def separation_power(
    reference: np.ndarray,
    generated: np.ndarray,
    bins: np.ndarray | int,
    *,
    overflow: bool = False,
) -> float:
    """Separation power <S^2> in [0, 1] of two samples (arXiv 2009.03796 eq. 15).

    Each histogram is normalised to unit sum over the values it counts, exactly as the
    CaloChallenge evaluation does (``density=True`` times the bin widths). Bins empty in
    both histograms contribute nothing (the challenge adds 1e-16 to the denominator, which
    has the same effect).

    Out-of-range and non-finite values: dropped by default, like ``np.histogram`` in the
    challenge code; with ``overflow=True`` they are counted in the edge bins (see
    :func:`histogram`). If nothing is left to count in a histogram, normalisation is
    undefined, so: both empty -> 0.0 (nothing to tell apart), exactly one empty -> 1.0
    (one sample has no mass where the other has all of it).

    Args:
        reference: values of the reference sample (any shape, flattened).
        generated: values of the generated sample (any shape, flattened).
        bins: explicit bin edges, or a number of equal-width bins spanning both samples.
        overflow: count out-of-range values in the first/last bin instead of dropping them.

    Returns:
        A Python float; symmetric in its two sample arguments.
    """
    edges = _edges(reference, generated, bins)
    h1 = histogram(reference, edges, overflow=overflow)
    h2 = histogram(generated, edges, overflow=overflow)
    n1, n2 = h1.sum(), h2.sum()
    if n1 == 0 or n2 == 0:
        if n1 == 0 and n2 == 0:
            logger.warning("separation_power: both histograms empty in range; returning 0.0")
            return 0.0
        logger.warning("separation_power: one histogram empty in range; returning 1.0")
        return 1.0
    p1, p2 = h1 / n1, h2 / n2
    total = p1 + p2
    mask = total > 0
    s2 = 0.5 * float(np.sum((p1[mask] - p2[mask]) ** 2 / total[mask]))
    # Rounding can push a disjoint pair a hair above 1.
    return min(max(s2, 0.0), 1.0)


def _widen(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty interval around a degenerate [lo, hi] (e.g. a constant feature).

    Without this a constant reference (all-zero deep HCAL layer, say) would give zero-width
    bins; half the magnitude on either side (or +-0.5 around zero) keeps the reference in
    the middle bin(s) so any deviation of the generated sample is visible.
    """
    # Relative tolerance: a range narrower than float64 can split gives repeated edges.
    if hi - lo > 1e-9 * max(abs(lo), abs(hi)):
        return lo, hi
    pad = 0.5 * abs(lo) if lo != 0 else 0.5
    return lo - pad, hi + pad


def binning_from_reference(
    reference: np.ndarray,
    n_bins: int = 50,
    *,
    log: bool = False,
    quantiles: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Bin edges derived from the reference sample alone.

    Used where no fixed challenge binning exists: fixing the edges from the reference once
    means every trial's generated sample is compared on identical bins, so scores from
    different trials are comparable. ``quantiles`` trims outliers that would otherwise
    stretch the range and leave most bins empty; pair trimmed edges with
    ``separation_power(..., overflow=True)`` so the trimmed tails still count.

    Args:
        reference: reference values (any shape, flattened; non-finite values ignored).
        n_bins: number of bins (edges has n_bins + 1 entries).
        log: logarithmically spaced edges over the positive reference values (energies
            spanning decades, as the CaloChallenge E_layer binning). Non-positive values
            fall below the first edge. If no reference value is positive, falls back to
            linear edges, since a log range cannot be defined.
        quantiles: (low, high) quantiles of the reference used as the range; (0, 1) is the
            full min..max range.

    Returns:
        A strictly increasing float64 array of n_bins + 1 edges.

    Raises:
        ValueError: on n_bins < 1, bad quantiles, or a reference without finite values.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    q_lo, q_hi = quantiles
    if not 0.0 <= q_lo < q_hi <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
    x = np.asarray(reference, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("cannot derive a binning from a reference with no finite values")
    if log:
        pos = x[x > 0]
        if pos.size > 0:
            lo, hi = np.log10(np.quantile(pos, [q_lo, q_hi]))
            if not hi - lo > 1e-9:
                lo, hi = lo - 0.5, hi + 0.5  # half a decade either side of a constant
            return np.logspace(lo, hi, n_bins + 1)
        logger.debug("binning_from_reference: no positive values for log bins; using linear")
    lo, hi = (float(v) for v in np.quantile(x, [q_lo, q_hi]))
    lo, hi = _widen(lo, hi)
    return np.linspace(lo, hi, n_bins + 1)
