"""High-level features on hand-made showers, checked against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calotune.metrics.hlf import (
    Binning,
    Layer,
    apply_threshold,
    challenge_bins,
    compute_hlf,
    group_means,
    separation_powers,
    voxel_spectrum_values,
)

# Layer 0: r edges (0, 2, 4) -> r_mid (1, 3), one alpha bin (no eta/phi features).
# Layer 1: r edges (0, 2, 6) -> r_mid (1, 4), 4 alpha bins with centres
#   -3pi/4, -pi/4, pi/4, 3pi/4. File order inside a layer: alpha-major, then r.
TINY = Binning(
    layers=(Layer((0.0, 2.0, 4.0), 1), Layer((0.0, 2.0, 6.0), 4)),
    layer_ids=(0, 7),
    threshold_mev=0.5,
)


def tiny_shower() -> np.ndarray:
    x = np.zeros(TINY.n_voxels)
    # layer 0: 3 MeV at r=1, 1 MeV at r=3
    x[0], x[1] = 3.0, 1.0
    # layer 1 (offset 2): alpha bin 2 (pi/4), r=1: 2 MeV; alpha bin 3 (3pi/4), r=4: 2 MeV;
    # alpha bin 0, r=1: 0.3 MeV (below threshold -> dropped)
    x[2 + 2 * 2 + 0] = 2.0
    x[2 + 3 * 2 + 1] = 2.0
    x[2 + 0 * 2 + 0] = 0.3
    return x[None, :]


def test_binning_counts_offsets_and_coordinates() -> None:
    assert TINY.n_voxels == 2 + 8
    assert TINY.layer_slice(1) == slice(2, 10)
    assert TINY.alpha_layers == (1,)
    r, eta, phi = TINY.layers[1].voxel_coordinates()
    np.testing.assert_allclose(r, [1, 4, 1, 4, 1, 4, 1, 4])
    alpha = np.repeat([-3 * np.pi / 4, -np.pi / 4, np.pi / 4, 3 * np.pi / 4], 2)
    np.testing.assert_allclose(eta, r * np.cos(alpha))
    np.testing.assert_allclose(phi, r * np.sin(alpha))


def test_threshold_zeroes_only_below() -> None:
    x = np.array([[0.1, 0.5, 0.49, 2.0]], dtype=np.float32)
    out = apply_threshold(x, 0.5)
    np.testing.assert_array_equal(out, [[0.0, 0.5, 0.0, 2.0]])
    assert out.dtype == np.float32
    assert x[0, 0] == pytest.approx(0.1)  # input untouched


def test_hand_computed_features() -> None:
    h = compute_hlf(tiny_shower(), np.array([10.0]), TINY)
    # energies: the 0.3 MeV voxel is below threshold
    assert h.e_tot[0] == pytest.approx(8.0)
    assert h.etot_einc[0] == pytest.approx(0.8)
    np.testing.assert_allclose(h.e_layer[0], [4.0, 4.0])
    # sparsity: layer 0 has 2 of 2 active -> 0; layer 1 has 2 of 8 active -> 0.75
    np.testing.assert_allclose(h.sparsity[0], [0.0, 0.75])
    # layer 0 radial: <r> = (3*1 + 1*3)/4 = 1.5; <r^2> = (3 + 9)/4 = 3 -> width sqrt(0.75)
    assert h.ec_r[0, 0] == pytest.approx(1.5)
    assert h.width_r[0, 0] == pytest.approx(math.sqrt(0.75))
    # layer 1 radial: r = 1 and 4 with 2 MeV each -> <r> 2.5, width 1.5
    assert h.ec_r[0, 1] == pytest.approx(2.5)
    assert h.width_r[0, 1] == pytest.approx(1.5)
    # layer 1 eta/phi: points (cos pi/4, sin pi/4) * 1 and (cos 3pi/4, sin 3pi/4) * 4
    c = math.sqrt(0.5)
    eta = np.array([c, -4 * c])
    phi = np.array([c, 4 * c])
    assert h.ec_eta[0, 0] == pytest.approx(eta.mean())
    assert h.ec_phi[0, 0] == pytest.approx(phi.mean())
    assert h.width_eta[0, 0] == pytest.approx(eta.std())
    assert h.width_phi[0, 0] == pytest.approx(phi.std())
    # eta/phi only for the alpha-binned layer, keyed by the detector's layer id
    assert h.ec_eta.shape == (1, 1)
    assert h.alpha_layer_ids == (7,)
    assert h.layer_ids == (0, 7)


def test_empty_layer_gives_zero_not_nan() -> None:
    x = np.zeros((1, TINY.n_voxels))
    x[0, 0] = 5.0  # layer 1 empty
    h = compute_hlf(x, np.array([5.0]), TINY)
    assert h.e_layer[0, 1] == 0.0
    assert h.ec_r[0, 1] == 0.0 and h.width_r[0, 1] == 0.0
    assert h.ec_eta[0, 0] == 0.0 and h.width_phi[0, 0] == 0.0
    assert h.sparsity[0, 1] == 1.0
    assert np.all(np.isfinite(h.high_level_vector()))


def test_high_level_vector_layout() -> None:
    h = compute_hlf(tiny_shower(), np.array([10.0]), TINY)
    v = h.high_level_vector()
    # 1 (E_inc) + 2 (E_layer) + 4 x 1 (EC/width eta/phi) + 1 (E_tot) + 2 (sparsity)
    # + 2 (EC_r) + 2 (width_r): the official vector since November 2023
    assert v.shape == (1, 14)
    assert v.dtype == np.float64
    assert v[0, 0] == pytest.approx(1.0)  # log10(10)
    assert v[0, 1] == pytest.approx(math.log10(4.0 + 1e-8))
    assert v[0, 3] == pytest.approx(h.ec_eta[0, 0] / 100)
    assert v[0, 7] == pytest.approx(math.log10(8.0 + 1e-8))
    np.testing.assert_allclose(v[0, 8:10], [0.0, 0.75])
    np.testing.assert_allclose(v[0, 10:12], h.ec_r[0] / 100)
    np.testing.assert_allclose(v[0, 12:14], h.width_r[0] / 100)


def test_sums_are_done_in_the_shower_dtype() -> None:
    """E_layer / E_tot are summed in the showers' dtype, as the challenge code does."""
    x = np.random.default_rng(1).exponential(1.0, size=(50, TINY.n_voxels)).astype(np.float32)
    h = compute_hlf(x, np.full(50, 10.0, np.float32), TINY)
    assert h.e_layer.dtype == np.float32 and h.e_tot.dtype == np.float32
    xt = apply_threshold(x, TINY.threshold_mev)
    np.testing.assert_array_equal(h.e_tot, xt.sum(axis=-1))
    np.testing.assert_array_equal(h.e_layer[:, 1], xt[:, 2:].sum(axis=-1))
    bins = challenge_bins(TINY, h)
    top = np.float32(h.e_layer[:, 1].max())
    assert bins["e_layer"][1][-1] == 10.0 ** np.float64(np.log10(top))


def test_subset_keeps_rows() -> None:
    x = np.repeat(tiny_shower(), 3, axis=0)
    x[1] *= 2
    h = compute_hlf(x, np.array([10.0, 20.0, 10.0]), TINY)
    s = h.subset(np.array([1]))
    assert len(s) == 1
    assert s.e_tot[0] == pytest.approx(16.6)  # doubled, and the 0.3 MeV voxel now passes
    assert s.layer_ids == h.layer_ids


def test_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="showers must be"):
        compute_hlf(np.zeros((2, 9)), np.ones(2), TINY)


def test_voxel_spectrum_values_drops_zeros_and_subthreshold() -> None:
    vals = voxel_spectrum_values(tiny_shower(), 0.5)
    np.testing.assert_allclose(np.sort(vals), [1.0, 2.0, 2.0, 3.0])


def test_challenge_bins_and_separation() -> None:
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, size=(400, TINY.n_voxels))
    e = np.full(400, 12.0)
    ref = compute_hlf(x, e, TINY)
    same = compute_hlf(x.copy(), e, TINY)
    shifted = compute_hlf(1.3 * x, e, TINY)
    bins = challenge_bins(TINY, ref, voxel_max=float(x.max()))
    assert len(bins["etot_einc"][0]) == 101
    assert bins["etot_einc"][0][0] == 0.5 and bins["etot_einc"][0][-1] == 1.5
    assert len(bins["e_layer"]) == 2 and len(bins["e_layer"][0]) == 40
    assert bins["e_layer"][0][0] == pytest.approx(0.5)  # starts at the threshold
    assert bins["e_layer"][1][-1] == pytest.approx(ref.e_layer[:, 1].max())
    assert len(bins["ec_eta"]) == 1  # alpha-binned layers only
    assert len(bins["sparsity"][0]) == 21
    assert len(bins["voxel_energy"][0]) == 50
    zero = separation_powers(ref, same, bins)
    assert all(v == 0.0 for values in zero.values() for v in values)
    moved = separation_powers(ref, shifted, bins)
    assert moved["e_layer"][0] > 0.05
    assert moved["etot_einc"][0] > 0.1
    means = group_means(moved)
    assert set(means) >= {"etot_einc", "e_layer", "center", "width", "sparsity", "mean"}
    assert means["e_layer"] == pytest.approx(np.mean(moved["e_layer"]))


def test_ds2_default_limits_close_to_challenge() -> None:
    edges = tuple(np.linspace(0, 41.85, 10))
    b = Binning(layers=(Layer(edges, 16),))
    ec, width, ec_r, width_r = b.limits(0)
    assert ec == pytest.approx(30.0, abs=1.0)
    assert ec_r == pytest.approx(42.0, abs=1.0)
    assert width_r == pytest.approx(20.0, abs=1.0)
    assert width == pytest.approx(30.0, abs=1.0)
