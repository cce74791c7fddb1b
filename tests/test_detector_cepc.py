"""The CEPC ECAL barrel detector (``cepc-ecal``): geometry, synthesis, files, scores."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.detectors import get_detector
from calotune.detectors.cepc.evaluation import cepc_features, duplicate_fraction
from calotune.detectors.cepc.geometry import CEPCGeometry, cell_centres, cell_indices, impact
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet

#: a coarse readout keeps the samples small (about 50 cells per shower)
COARSE = {"cell_mm": 60.0, "threshold_mev": 50.0}


@pytest.fixture(scope="module")
def detector():
    return get_detector("cepc-ecal", **COARSE)


@pytest.fixture(scope="module")
def sample(detector) -> PointCloudSet:
    return detector.synthesize(150, seed=3)


def test_defaults_are_the_seed_barrel_and_binning() -> None:
    g = CEPCGeometry()
    assert (g.inner_radius_mm, g.outer_radius_mm, g.half_length_mm) == (1830.0, 2130.0, 2900.0)
    assert (g.n_layers, g.n_phi_modules, g.n_z_modules) == (28, 32, 15)
    assert (g.bins_r, g.bins_z, g.bins_phi) == (28, 15, 32)
    assert g.layer_mm == pytest.approx(300.0 / 28)


@pytest.mark.parametrize("bad", [{"n_layers": 0}, {"cell_mm": -1.0}, {"outer_radius_mm": 1800.0},
                                 {"threshold_mev": math.nan}])
def test_impossible_geometry_is_refused_by_name(bad: dict) -> None:
    with pytest.raises(UserError, match=next(iter(bad))):
        CEPCGeometry(**bad)


def test_cell_centres_locate_back_to_their_cells() -> None:
    g = CEPCGeometry(**COARSE)
    rng = np.random.default_rng(0)
    layer = rng.integers(0, g.n_layers, 500)
    iz = rng.integers(0, g.n_z_cells, 500)
    iphi = rng.integers(0, g.n_phi_cells, 500)
    back = cell_indices(g, cell_centres(g, layer, iz, iphi))
    assert back[3].all()
    for want, got in zip((layer, iz, iphi), back[:3], strict=False):
        np.testing.assert_array_equal(want, got)


def test_synthesis_is_physical(detector, sample: PointCloudSet) -> None:
    g = detector.geometry
    assert list(sample.conditions) == ["energy", "px", "py", "pz"]
    p = np.column_stack([sample.conditions[k] for k in ("px", "py", "pz")]).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), sample.conditions["energy"], rtol=1e-5)  # massless
    assert (sample.counts > 5).all()
    assert (sample.hits[:, 3] >= g.threshold_mev).all()
    ratio = sample.total_energy() / sample.conditions["energy"]
    assert 0.85 < ratio.mean() < 1.02 and 0.01 < ratio.std() < 0.15  # sampling-corrected, ~17 %/sqrt(E)
    layer, iz, iphi, inside = cell_indices(g, sample.hits[:, :3])
    assert inside.all()
    event = np.repeat(np.arange(len(sample)), sample.counts)
    key = ((event * g.n_layers + layer) * g.n_z_cells + iz) * g.n_phi_cells + iphi
    assert len(np.unique(key)) == len(key)  # one hit per fired cell
    # the shower sits where the particle points: energy-weighted phi and z at the impact
    phi0, z0 = impact(g, p[:, 0], p[:, 1], p[:, 2])
    phi = np.arctan2(sample.hits[:, 1], sample.hits[:, 0])
    dphi = (phi - phi0[event] + math.pi) % (2 * math.pi) - math.pi
    e = sample.hits[:, 3]
    centre = np.bincount(event, e * dphi) / np.bincount(event, e) * g.inner_radius_mm
    assert np.abs(centre).max() < 2 * g.cell_mm
    # deeper layers sit farther out along the axis: z follows the direction's slope
    slope = np.bincount(event, e * (sample.hits[:, 2] - z0[event])) / np.bincount(event, e)
    assert np.corrcoef(slope, p[:, 2] / np.hypot(p[:, 0], p[:, 1]))[0, 1] > 0.5


def test_synthesis_is_reproducible_and_checks_options(detector, sample: PointCloudSet) -> None:
    again = detector.synthesize(150, seed=3)
    np.testing.assert_array_equal(again.hits, sample.hits)
    assert not np.array_equal(detector.synthesize(20, seed=4).hits[:50], sample.hits[:50])
    electrons = detector.synthesize(20, seed=3, particle="electron", e_min_gev=5, e_max_gev=5)
    np.testing.assert_allclose(electrons.conditions["energy"], 5000.0)
    with pytest.raises(UserError, match="unknown option"):
        detector.synthesize(5, seed=1, colour="red")
    with pytest.raises(UserError, match="particle"):
        detector.synthesize(5, seed=1, particle="pion")


def test_files_round_trip_and_name_the_bad_key(detector, sample: PointCloudSet, tmp_path: Path) -> None:
    path = tmp_path / "cepc.h5"
    detector.write(path, sample)
    back = detector.read(path)
    np.testing.assert_array_equal(back.hits, sample.hits)
    np.testing.assert_array_equal(back.offsets, sample.offsets)
    for k in sample.conditions:
        np.testing.assert_array_equal(back.conditions[k], np.asarray(sample.conditions[k], back.conditions[k].dtype))
    assert detector.write_stream(tmp_path / "s.h5", [sample.subset(slice(0, 7)), sample.subset(slice(7, None))]) \
        == len(sample)
    np.testing.assert_array_equal(detector.read(tmp_path / "s.h5").hits, sample.hits)
    assert len(detector.read_conditions(path, max_events=5)["pz"]) == 5
    with h5py.File(path, "r+") as f:
        del f["incident_pz"]
    with pytest.raises(UserError) as info:
        detector.read(path)
    assert str(path) in str(info.value) and "incident_pz" in str(info.value)


def test_scores_floor_other_sample_and_collapse(detector, sample: PointCloudSet) -> None:
    itself = detector.scores(sample, sample)
    assert itself["mean_separation"] == 0.0 and itself["duplicate_fraction"] == 0.0
    assert set(detector.objectives()) <= set(itself)
    other = detector.scores(sample, detector.synthesize(150, seed=4))
    assert 0.0 < other["mean_separation"] < 0.2  # two samples of one law: small, not zero
    # a collapsed generator: the same shower (event 0) whatever it is asked
    one = sample.event(0)
    collapsed = PointCloudSet(sample.conditions, np.tile(one, (len(sample), 1)),
                              np.arange(len(sample) + 1) * len(one))
    bad = detector.scores(sample, collapsed)
    assert bad["duplicate_fraction"] == 1.0
    assert bad["mean_separation"] > 3 * other["mean_separation"]
    assert duplicate_fraction(sample) == 0.0


def test_finer_binning_changes_the_layer_profile_width(sample: PointCloudSet) -> None:
    coarse = cepc_features(sample, CEPCGeometry(**COARSE))
    fine = cepc_features(sample, CEPCGeometry(**COARSE, bins_r=56, bins_z=150, bins_phi=320))
    assert coarse["layer_energy"].shape[1] == 28 and fine["layer_energy"].shape[1] == 56
    np.testing.assert_allclose(fine["layer_energy"].sum(1), coarse["layer_energy"].sum(1), rtol=1e-6)


def test_plots_are_written(detector, sample: PointCloudSet, tmp_path: Path) -> None:
    paths = detector.plot(sample, detector.synthesize(60, seed=5), tmp_path)
    assert paths and all(p.stat().st_size > 1000 for p in paths)
