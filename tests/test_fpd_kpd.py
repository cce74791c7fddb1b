"""FPD and KPD against their definitions (Kansal et al., arXiv 2211.10295)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from calotune.metrics.fpd_kpd import (
    DistanceResult,
    fpd,
    frechet_distance,
    kpd,
    mmd2_poly_unbiased,
    normalise_features,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_matches_sqrtm_formula() -> None:
    rng = np.random.default_rng(1)
    for d in (1, 3, 8):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_one_dimensional_closed_form() -> None:
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                            np.array([[9.0]])) == pytest.approx(4.0 + 1.0)


def test_frechet_singular_covariance_is_finite() -> None:
    s = np.zeros((3, 3))
    s[0, 0] = 1.0
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)


def test_mmd_matches_brute_force_definition() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / 3 + 1) ** 4

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert mmd2_poly_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_normalisation_uses_reference_max_only() -> None:
    ref = np.array([[1.0, -4.0, 0.0], [2.0, 2.0, 0.0]])
    gen = np.array([[10.0, 8.0, 3.0]])
    r, g = normalise_features(ref, gen)
    np.testing.assert_allclose(r, [[0.5, -1.0, 0.0], [1.0, 0.5, 0.0]])
    np.testing.assert_allclose(g, [[5.0, 2.0, 3.0]])  # all-zero feature left unscaled


def test_identical_samples_give_zero() -> None:
    x = np.random.default_rng(3).normal(size=(3000, 6))
    f = fpd(x, x, num_batches=5, adaptive=True)
    k = kpd(x, x, batch_size=1000)
    assert isinstance(f, DistanceResult)
    assert f.value_x1e3 < 1.0
    assert abs(k.value_x1e3) < 0.5
    assert f.n_reference == f.n_generated == 3000
    # adaptive (search scores): sizes scaled from 0.2 N to N, spaced uniformly in 1/N
    assert f.sample_sizes[0] == 600 and f.sample_sizes[-1] == 3000
    inv = 1.0 / np.asarray(f.sample_sizes, dtype=float)
    assert np.allclose(np.diff(inv), np.diff(inv)[0], rtol=3e-2)
    assert k.sample_sizes == (1000,)
    assert k.as_dict()["value_x1e3"] == pytest.approx(k.value * 1e3)


def test_distributions_that_differ_are_detected() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(4000, 5))
    same = rng.normal(size=(4000, 5))
    shifted = rng.normal(size=(4000, 5))
    shifted[:, 0] += 0.5
    f_same = fpd(ref, same, num_batches=5, adaptive=True)
    f_shift = fpd(ref, shifted, num_batches=5, adaptive=True)
    k_same, k_shift = kpd(ref, same, batch_size=1000), kpd(ref, shifted, batch_size=1000)
    assert f_shift.value > 10 * max(f_same.value, 1e-4)
    assert k_shift.value > k_same.value + 3 * max(k_shift.error, k_same.error)
    assert f_shift.error >= 0 and k_shift.error >= 0


def test_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    assert fpd(a, b, num_batches=3, seed=1) == fpd(a, b, num_batches=3, seed=1)
    assert kpd(a, b, seed=1, adaptive=True) == kpd(a, b, seed=1, adaptive=True)


def test_defaults_are_the_calochallenge_settings() -> None:
    """evaluate.py of the CaloChallenge calls fpd(min_samples=10000) (max 50,000) and
    kpd(batch_size=10000), drawing with replacement whatever the sample size."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(300, 3)), rng.normal(size=(300, 3))
    f = fpd(a, b, num_batches=1, num_points=2)
    # 1 / (1 / 50000) truncates to 49,999 in float64, in jetnet as here
    assert f.sample_sizes == (10_000, 49_999)
    k = kpd(a, b, num_batches=1)
    assert k.sample_sizes == (10_000,)
    assert fpd(a, b, num_batches=1, num_points=2, adaptive=True).sample_sizes[0] == 60


def test_explicit_sizes_and_bad_input() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
    f = fpd(a, b, min_samples=100, max_samples=200, num_points=3, num_batches=2)
    assert f.sample_sizes == (100, 133, 200)
    assert f.n_batches == 2
    with pytest.raises(ValueError, match="min_samples < max_samples"):
        fpd(a, b, min_samples=200, max_samples=200)
    with pytest.raises(ValueError, match="feature counts differ"):
        kpd(a, rng.normal(size=(300, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        fpd(np.full((10, 2), np.nan), b)


def test_bootstraps_larger_than_the_sample_use_weighted_rows_exactly() -> None:
    """Draws of 10k-50k rows from a small sample (the challenge setting) are computed on
    the distinct rows with their draw counts; the numbers are those of the drawn rows."""
    from calotune.metrics.fpd_kpd import _bootstrap_mmd2, _bootstrap_moments

    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) + 0.2
    ix, iy = rng.choice(120, size=700), rng.choice(90, size=700)
    assert _bootstrap_mmd2(x, ix, y, iy) == pytest.approx(
        mmd2_poly_unbiased(x[ix], y[iy]), rel=1e-10)
    mean, cov = _bootstrap_moments(x, ix)
    np.testing.assert_allclose(mean, x[ix].mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cov, np.cov(x[ix], rowvar=False), rtol=1e-10, atol=1e-14)
