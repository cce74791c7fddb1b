"""Classifier two-sample test (arXiv 2410.21611) and its statistics helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calotune.detectors import get_detector
from calotune.metrics.classifier import (
    CHALLENGE,
    FAST,
    IsotonicCalibrator,
    classifier_test,
    get_config,
    high_level_inputs,
    low_level_inputs,
    roc_auc,
)
from calotune.metrics.hlf import compute_hlf


def test_roc_auc_hand_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # one of four (pos, neg) pairs inverted -> 0.75
    assert roc_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.9]) == pytest.approx(0.75)
    # ties count one half
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])


def test_roc_auc_matches_sklearn_if_available() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.5, 1.0), 1)  # rounding creates ties
    assert roc_auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_isotonic_hand_case() -> None:
    # PAV on y = (1, 3, 2, 4): the violating pair (3, 2) pools to 2.5
    cal = IsotonicCalibrator.fit([1, 2, 3, 4], [1, 3, 2, 4])
    np.testing.assert_allclose(cal.y, [1, 2.5, 2.5, 4])
    # linear interpolation inside, clipping outside
    np.testing.assert_allclose(cal.predict(np.array([0.0, 1.5, 3.5, 9.0])),
                               [1.0, 1.75, 3.25, 4.0])
    # tied inputs are pooled first (weighted mean of their targets)
    tied = IsotonicCalibrator.fit([1, 1, 2], [0, 1, 1])
    np.testing.assert_allclose(tied.x, [1, 2])
    np.testing.assert_allclose(tied.y, [0.5, 1.0])
    clipped = IsotonicCalibrator.fit([0, 1], [0, 1], y_min=1e-6, y_max=1 - 1e-6)
    np.testing.assert_allclose(clipped.y, [1e-6, 1 - 1e-6])


def test_isotonic_matches_sklearn_if_available() -> None:
    isotonic = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(1)
    x = np.round(rng.uniform(0, 1, 400), 2)
    y = (rng.uniform(0, 1, 400) < x).astype(float)
    ours = IsotonicCalibrator.fit(x, y, y_min=1e-6, y_max=1 - 1e-6)
    ref = isotonic.IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6)
    ref.fit(x, y)
    grid = np.linspace(-0.1, 1.1, 97)
    np.testing.assert_allclose(ours.predict(grid), ref.predict(grid), atol=1e-12)


def test_settings() -> None:
    assert CHALLENGE.hidden == (2048, 2048, 2048)
    assert (CHALLENGE.lr, CHALLENGE.batch_size, CHALLENGE.epochs) == (2e-4, 1000, 50)
    assert get_config("fast") is FAST
    with pytest.raises(ValueError, match="unknown classifier setting"):
        get_config("slow")


def test_low_level_inputs_layout() -> None:
    showers = np.array([[0.5, 2.0, 0.01]], dtype=np.float32)
    x = low_level_inputs(showers, np.array([100.0]), threshold_mev=0.1)
    np.testing.assert_allclose(x, [[2.0, 0.005, 0.02, 0.0]], rtol=1e-6)
    assert x.dtype == np.float32


@pytest.fixture(scope="module")
def ds2_samples() -> dict[str, np.ndarray]:
    det = get_detector("calochallenge-2")
    a = det.synthesize(1600, seed=11)
    b = det.synthesize(800, seed=12)
    out = {}
    for name, s in (("a", a), ("b", b)):
        out[f"{name}_x"] = s.cells["showers"]
        out[f"{name}_e"] = s.conditions["energy"]
        out[f"{name}_hlf"] = compute_hlf(s.cells["showers"], s.conditions["energy"], det.binning)
        out[f"{name}_hlf_scaled"] = compute_hlf(1.1 * s.cells["showers"], s.conditions["energy"],
                                                det.binning)
    return out


def test_relative_high_level_inputs() -> None:
    from calotune.metrics.hlf import Binning, Layer

    binning = Binning(layers=(Layer((0.0, 1.0), 1), Layer((0.0, 1.0), 2)))
    h = compute_hlf(np.array([[10.0, 30.0, 60.0]]), np.array([1000.0]), binning)
    plain, rel = high_level_inputs(h), high_level_inputs(h, relative=True)
    assert plain[0, 0] == rel[0, 0] == pytest.approx(3.0)
    np.testing.assert_allclose(rel[0, 1:3], np.log10([0.01, 0.09]), rtol=1e-5)
    # E_tot / E_inc: after E_inc, 2 E_layer and 4 eta/phi columns (r columns at the end)
    np.testing.assert_allclose(rel[0, 7], np.log10(0.1), rtol=1e-5)
    np.testing.assert_allclose(np.delete(rel, [1, 2, 7], axis=1),
                               np.delete(plain, [1, 2, 7], axis=1))


def test_same_distribution_gives_auc_near_half(ds2_samples: dict) -> None:
    h = high_level_inputs(ds2_samples["a_hlf"], relative=True)
    res = classifier_test(h[:800], h[800:], "fast", seed=3)
    assert abs(res.auc - 0.5) < 0.08
    assert res.jsd < 0.05
    assert res.n_per_class == 800
    assert (res.n_train, res.n_test, res.n_val) == (960, 320, 320)
    assert 1 <= res.best_epoch <= FAST.epochs
    assert res.setting == "fast" and res.n_features == h.shape[1]


def test_energy_scale_distortion_is_detected_high_level(ds2_samples: dict) -> None:
    ref = high_level_inputs(ds2_samples["a_hlf"], relative=True)
    bad = high_level_inputs(ds2_samples["b_hlf_scaled"], relative=True)
    res = classifier_test(ref, bad, "fast", seed=3)
    # a single-feature cut on E_tot / E_inc reaches AUC 0.90 on these samples
    assert res.auc > 0.75
    assert res.jsd > 0.1
    assert res.n_per_class == 800  # the larger sample is subsampled


def test_energy_scale_distortion_is_detected_low_level(ds2_samples: dict) -> None:
    ref = low_level_inputs(ds2_samples["a_x"][:800], ds2_samples["a_e"][:800])
    bad = low_level_inputs(1.1 * ds2_samples["b_x"], ds2_samples["b_e"])
    res = classifier_test(ref, bad, "fast", seed=3, standardize=False)
    assert res.auc > 0.7


def test_challenge_path_runs_with_challenge_inputs(ds2_samples: dict) -> None:
    """The challenge code path (no standardisation, torch's thread setting, plain
    challenge inputs) on a shrunken network; the full 2048x3 x 50 epochs is for reports."""
    import dataclasses

    small = dataclasses.replace(CHALLENGE, hidden=(16, 16, 16), epochs=2)
    h = high_level_inputs(ds2_samples["a_hlf"])
    res = classifier_test(h[:300], h[300:600], small, seed=1)
    assert res.setting == "challenge" and res.best_epoch in (1, 2)
    assert 0.0 <= res.auc <= 1.0 and res.n_per_class == 300


def test_deterministic(ds2_samples: dict) -> None:
    h = high_level_inputs(ds2_samples["a_hlf"], relative=True)
    first = classifier_test(h[:400], h[400:800], "fast", seed=7)
    second = classifier_test(h[:400], h[400:800], "fast", seed=7)
    assert first == second
    assert math.isfinite(first.jsd_uncalibrated)
