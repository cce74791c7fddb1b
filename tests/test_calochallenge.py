"""CaloChallenge detectors: geometry, voxel order, synthesis, file I/O and scores."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.detectors import get_detector
from calotune.detectors.calochallenge import (
    CaloChallenge,
    compare,
    dataset_1_photons,
    dataset_1_pions,
    dataset_2,
    dataset_3,
)
from calotune.errors import UserError
from calotune.metrics.fpd_kpd import fpd, kpd
from calotune.metrics.hlf import compute_hlf
from calotune.showers import ShowerSet

DS2_THRESHOLD = 0.5e-3 / 0.033


@pytest.mark.parametrize(
    ("name", "n_voxels", "n_layers"),
    [
        ("calochallenge-1-photons", 368, 5),
        ("calochallenge-1-pions", 533, 7),
        ("calochallenge-2", 6480, 45),
        ("calochallenge-3", 40500, 45),
    ],
)
def test_registry_geometry_counts(name: str, n_voxels: int, n_layers: int) -> None:
    det = get_detector(name)
    assert isinstance(det, CaloChallenge)
    assert det.name == name
    assert det.part_sizes == {"showers": n_voxels}
    assert det.binning.n_layers == n_layers
    assert det.conditions == ("energy",) and det.parts == ("showers",)
    again = CaloChallenge.from_geometry(det.geometry_dict())
    assert again.geometry == det.geometry


def test_ds1_layer_layout() -> None:
    photons = dataset_1_photons()
    assert photons.binning.layer_ids == (0, 1, 2, 3, 12)
    assert [lay.n_voxels for lay in photons.binning.layers] == [8, 160, 190, 5, 5]
    assert [(lay.n_r, lay.n_alpha) for lay in photons.binning.layers] == [
        (8, 1), (16, 10), (19, 10), (5, 1), (5, 1)]
    pions = dataset_1_pions()
    assert [(lay.n_r, lay.n_alpha) for lay in pions.binning.layers] == [
        (8, 1), (10, 10), (10, 10), (5, 1), (15, 10), (16, 10), (10, 1)]
    assert photons.geometry.threshold_mev == 1.0


def test_ds2_ds3_radial_edges_and_threshold() -> None:
    for det, n_r, n_alpha in ((dataset_2(), 9, 16), (dataset_3(), 18, 50)):
        layer = det.binning.layers[0]
        assert (layer.n_r, layer.n_alpha) == (n_r, n_alpha)
        assert layer.r_edges[0] == 0.0 and layer.r_edges[-1] == pytest.approx(41.85)
        assert np.allclose(np.diff(layer.r_edges), 41.85 / n_r)
        assert det.geometry.threshold_mev == pytest.approx(0.01515, abs=1e-5)


def test_reshape_order_layer_alpha_r() -> None:
    """Flat voxel k of ds2 is (layer, alpha, r) of reshape(45, 16, 9): checked through the
    features, which only know the per-layer binning."""
    det = dataset_2()
    layer, alpha, r = 7, 3, 5
    flat = np.ravel_multi_index((layer, alpha, r), (45, 16, 9))
    x = np.zeros((1, 6480), dtype=np.float32)
    x[0, flat] = 100.0
    assert x.reshape(1, 45, 16, 9)[0, layer, alpha, r] == 100.0
    h = compute_hlf(x, np.array([100.0]), det.binning)
    assert np.argmax(h.e_layer[0]) == layer
    r_mid = (r + 0.5) * 4.65
    assert h.ec_r[0, layer] == pytest.approx(r_mid)
    alpha_mid = -math.pi + (alpha + 0.5) * 2 * math.pi / 16
    assert h.ec_eta[0, layer] == pytest.approx(r_mid * math.cos(alpha_mid), rel=1e-6)
    assert h.ec_phi[0, layer] == pytest.approx(r_mid * math.sin(alpha_mid), rel=1e-6)


def test_overrides_and_bad_overrides() -> None:
    det = get_detector("calochallenge-2", threshold_mev=0.1)
    assert det.geometry.threshold_mev == 0.1
    with pytest.raises(UserError, match="bad geometry override"):
        get_detector("calochallenge-2", not_a_field=1)
    with pytest.raises(UserError, match="invalid geometry"):
        dataset_2(n_alpha=(16,) * 44)
    with pytest.raises(UserError, match="unknown keys"):
        CaloChallenge.from_geometry({**dataset_2().geometry_dict(), "colour": "red"})


@pytest.mark.parametrize("factory", [dataset_1_photons, dataset_1_pions, dataset_2])
def test_synthetic_showers_are_physical(factory) -> None:
    det = factory()
    sample = det.synthesize(300, seed=5)
    x, e = sample.cells["showers"], sample.conditions["energy"]
    assert x.shape == (300, det.geometry.n_voxels) and x.dtype == np.float32
    assert e.shape == (300,) and e.dtype == np.float32
    assert np.all(np.isfinite(x)) and np.all(x >= 0)
    thr = det.geometry.threshold_mev
    assert not np.any((x > 0) & (x < thr))  # readout threshold applied
    assert np.mean(x > 0) > 0.05  # not empty
    ratio = x.sum(axis=1) / e
    if det.geometry.particle == "pion":
        assert 0.4 < ratio.mean() < 1.0  # non-compensating: h/e < 1
    else:
        assert 0.9 < ratio.mean() < 1.05
    if det.geometry.discrete_energies_mev:
        assert set(np.unique(e).tolist()) <= {float(2**k) for k in range(8, 23)}
        assert len(np.unique(e)) > 10
    else:
        assert e.min() >= 1e3 and e.max() <= 1e6
        assert np.mean(e < 1e4) == pytest.approx(1 / 3, abs=0.1)  # log-uniform


def test_ds2_longitudinal_and_lateral_shape() -> None:
    det = dataset_2()
    low = det.synthesize(200, seed=1, energies=np.full(200, 2e3))
    high = det.synthesize(200, seed=1, energies=np.full(200, 5e5))
    h_low = compute_hlf(low.cells["showers"], low.conditions["energy"], det.binning)
    h_high = compute_hlf(high.cells["showers"], high.conditions["energy"], det.binning)
    # GFlash: the shower maximum moves deeper with energy (T ~ ln y)
    assert np.argmax(h_high.e_layer.mean(0)) > np.argmax(h_low.e_layer.mean(0))
    # resolution improves with energy (sampling fluctuations ~ 1/sqrt(E))
    assert h_high.etot_einc.std() < 0.5 * h_low.etot_einc.std()
    # energy is centred on the axis
    assert abs(h_high.ec_eta[:, 10:20].mean()) < 0.5


def test_ds3_small_sample_shape() -> None:
    sample = dataset_3().synthesize(8, seed=2)
    assert sample.cells["showers"].shape == (8, 40500)


def test_synthesis_is_deterministic() -> None:
    det = dataset_2()
    a, b, c = det.synthesize(50, seed=3), det.synthesize(50, seed=3), det.synthesize(50, seed=4)
    np.testing.assert_array_equal(a.cells["showers"], b.cells["showers"])
    assert not np.array_equal(a.cells["showers"], c.cells["showers"])
    with pytest.raises(UserError, match="unknown options"):
        det.synthesize(5, seed=1, colour="red")


def test_write_read_round_trip(tmp_path: Path) -> None:
    det = dataset_1_photons()
    sample = det.synthesize(40, seed=9)
    path = tmp_path / "sub" / "photons.h5"
    det.write(path, sample)
    with h5py.File(path, "r") as f:
        assert f["incident_energies"].shape == (40, 1)
        assert f["showers"].shape == (40, 368)
        assert f["showers"].compression == "gzip"
        assert f["incident_energies"].compression == "gzip"
    assert [p.name for p in path.parent.iterdir()] == ["photons.h5"]  # no temp file left
    back = det.read(path)
    np.testing.assert_array_equal(back.cells["showers"], sample.cells["showers"])
    np.testing.assert_array_equal(back.conditions["energy"], sample.conditions["energy"])
    assert len(det.read(path, max_events=7)) == 7


def _write_raw(path: Path, energies: np.ndarray, showers: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=energies)
        f.create_dataset("showers", data=showers)
    return path


def test_reader_accepts_plain_challenge_file(tmp_path: Path) -> None:
    """A file as the challenge distributes it: float64, no attributes, no compression."""
    rng = np.random.default_rng(0)
    showers = rng.exponential(1.0, (5, 6480))
    path = _write_raw(tmp_path / "real.hdf5", np.full((5, 1), 2e3), showers)
    sample = dataset_2().read(path)
    np.testing.assert_allclose(sample.cells["showers"], showers.astype(np.float32))
    assert sample.conditions["energy"].shape == (5,)


def test_reader_refuses_wrong_width(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "narrow.h5", np.ones((3, 1)), np.zeros((3, 6479)))
    with pytest.raises(UserError) as info:
        dataset_2().read(path)
    msg = str(info.value)
    for part in ("narrow.h5", "showers", "6479", "6480", "dataset 2"):
        assert part in msg
    # a width that belongs to another dataset is named
    path = _write_raw(tmp_path / "ds1.h5", np.ones((3, 1)), np.zeros((3, 368)))
    with pytest.raises(UserError, match="width of dataset 1-photons"):
        dataset_2().read(path)


@pytest.mark.parametrize(
    ("energies", "showers", "pattern"),
    [
        (np.ones((3, 1)), np.zeros((2, 368)), "3"),
        (np.ones((3, 1)), -np.ones((3, 368)), "negative"),
        (np.ones((3, 1)), np.full((3, 368), np.nan), "NaN"),
        (np.zeros((3, 1)), np.zeros((3, 368)), "incident_energies"),
        (np.ones((3, 2)), np.zeros((3, 368)), r"\(N, 1\)"),
    ],
)
def test_reader_refuses_bad_content(tmp_path: Path, energies: np.ndarray,
                                    showers: np.ndarray, pattern: str) -> None:
    path = _write_raw(tmp_path / "bad.h5", energies, showers)
    with pytest.raises(UserError, match=pattern):
        dataset_1_photons().read(path)


def test_reader_refuses_missing_key_and_non_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "nokey.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=np.zeros((2, 368)))
    with pytest.raises(UserError, match="incident_energies"):
        dataset_1_photons().read(path)
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    with pytest.raises(UserError, match=r"notes\.txt"):
        dataset_1_photons().read(text)
    with pytest.raises(UserError, match=r"missing\.h5"):
        dataset_1_photons().read(tmp_path / "missing.h5")


def test_reader_refuses_file_written_for_another_detector(tmp_path: Path) -> None:
    path = tmp_path / "photons.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=np.ones((2, 1)))
        f.create_dataset("showers", data=np.zeros((2, 368)))
        f.attrs["detector"] = "zdc"
    with pytest.raises(UserError, match=r"photons\.h5: attribute 'detector' is 'zdc'"):
        dataset_1_photons().read(path)


def test_write_refuses_wrong_width(tmp_path: Path) -> None:
    bad = ShowerSet(conditions={"energy": np.ones(2, np.float32)},
                    cells={"showers": np.zeros((2, 10), np.float32)})
    with pytest.raises(UserError, match="6480"):
        dataset_2().write(tmp_path / "x.h5", bad)


@pytest.fixture(scope="module")
def ds2_pair() -> tuple[ShowerSet, ShowerSet]:
    det = dataset_2()
    return det.synthesize(1200, seed=21), det.synthesize(1200, seed=22)


def _distorted(sample: ShowerSet, showers: np.ndarray) -> ShowerSet:
    return ShowerSet(conditions=dict(sample.conditions), cells={"showers": showers})


def test_energy_scale_distortion_detected_above_floor(ds2_pair) -> None:
    """A 10 % energy-scale error: E_tot/E_inc separation and classifier AUC sit clearly
    above the reference-vs-reference floor (two independent synthetic samples).

    FPD/KPD are deliberately not asserted here: on the challenge's high-level vector a
    10 % scale moves only the normalised log-energy means, ||dmu||^2 ~ 2e-3, far below the
    finite-sample FPD floor at 1,200 events (~0.5; 10.8e-3 even at the challenge's 10^5
    events). They are tested on a distortion they are built to see, below.
    """
    det = dataset_2()
    ref, twin = ds2_pair
    bad = _distorted(twin, 1.1 * twin.cells["showers"])
    kwargs = {"classifier": "fast", "classifier_inputs": ("high",), "distances": False}
    floor = compare(det.binning, ref, twin, **kwargs)
    hit = compare(det.binning, ref, bad, **kwargs)
    assert hit.separation["etot_einc"][0] > 0.2
    assert hit.separation["etot_einc"][0] > 10 * floor.separation["etot_einc"][0]
    assert hit.classifier["high"].auc > 0.75
    assert abs(floor.classifier["high"].auc - 0.5) < 0.1
    assert hit.classifier["high"].auc > floor.classifier["high"].auc + 0.2
    scores = hit.objectives()
    assert set(scores) == set(det.objectives())
    assert math.isnan(scores["fpd"]) and math.isnan(scores["auc_low"])  # not computed


def test_depth_distortion_detected_by_fpd_kpd(ds2_pair) -> None:
    """Showers pushed two layers deeper change the E_layer block of the high-level vector,
    which FPD and KPD (arXiv 2211.10295) must flag above the floor."""
    det = dataset_2()
    ref, twin = ds2_pair
    deeper = np.roll(twin.cells["showers"].reshape(-1, 45, 144), 2, axis=1)
    deeper[:, :2] = 0.0
    bad = _distorted(twin, deeper.reshape(-1, 6480))
    vectors = [
        compute_hlf(s.cells["showers"], s.conditions["energy"], det.binning).high_level_vector()
        for s in (ref, twin, bad)
    ]
    small = {"num_batches": 2, "num_points": 5}  # test-sized bootstrap; sizes are reported
    fpd_floor = fpd(vectors[0], vectors[1], **small)
    fpd_hit = fpd(vectors[0], vectors[2], **small)
    kpd_floor = kpd(vectors[0], vectors[1], batch_size=600, num_batches=6)
    kpd_hit = kpd(vectors[0], vectors[2], batch_size=600, num_batches=6)
    assert fpd_hit.value > 1.5 * fpd_floor.value
    assert fpd_hit.value - fpd_floor.value > 5 * (fpd_hit.error + fpd_floor.error)
    assert kpd_hit.value > kpd_floor.value + 5 * (kpd_hit.error + kpd_floor.error)
    assert fpd_hit.n_reference == 1200 and kpd_hit.sample_sizes == (600,)


def test_scores_and_plots_interface(tmp_path: Path) -> None:
    det = dataset_1_photons()
    ref, gen = det.synthesize(400, seed=1), det.synthesize(400, seed=2)
    scores = det.scores(ref, gen)
    assert set(scores) == set(det.objectives())
    assert all(mode == "min" for mode in det.objectives().values())
    assert all(math.isfinite(v) for v in scores.values())
    assert 0 <= scores["sep_mean"] < 0.2
    paths = det.plot(ref, gen, tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"etot_einc.png", "e_layer.png", "ec_eta.png", "width_r.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)
