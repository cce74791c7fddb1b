"""The ``atlas-regular`` detector: the ATLAS-like regular binning (z = 7, r = 24, phi = 14)
of CaloQVAE on the dataset-1 barrel layers, with synthetic showers. The shared contract
(file round trip, damaged files, scores at the floor, point clouds) is checked by
tests/test_conformance_detectors.py; these tests check what is particular to it."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.detectors import detector_names, get_detector
from calotune.detectors.atlas_regular import LAYER_IDS, AtlasRegular, AtlasRegularGeometry
from calotune.errors import UserError
from calotune.spec import load_spec


@pytest.fixture(scope="module")
def detector() -> AtlasRegular:
    return get_detector("atlas-regular")


@pytest.fixture(scope="module")
def showers(detector: AtlasRegular):
    return detector.synthesize(200, seed=7)


def test_default_binning_is_7_by_14_by_24(detector: AtlasRegular) -> None:
    assert "atlas-regular" in detector_names()
    assert detector.part_sizes == {"showers": 2352} and detector.parts == ("showers",)
    g = detector.geometry
    assert g.layer_ids == LAYER_IDS == (0, 1, 2, 3, 12, 13, 14)
    assert g.n_alpha == (14,) * 7
    for edges in g.r_edges_mm:  # the same equal-width radial bins in every layer
        assert len(edges) == 25 and edges[0] == 0.0 and edges[-1] == 480.0
        np.testing.assert_allclose(np.diff(edges), 20.0)
    assert [g.binning.layer_slice(i).stop - g.binning.layer_slice(i).start for i in range(7)] == [336] * 7
    assert detector.objectives()["fpd"] == "min" and detector.objectives()["kpd"] == "min"


def test_geometry_overrides_round_trip_and_bad_values_name_the_rule() -> None:
    small = get_detector("atlas-regular", n_r=6, n_phi=4, r_max_mm=300.0)
    assert small.part_sizes == {"showers": 7 * 4 * 6}
    again = AtlasRegular.from_geometry(small.geometry_dict())
    assert again.geometry_dict() == small.geometry_dict() == {"n_r": 6, "n_phi": 4, "r_max_mm": 300.0,
                                                                "particle": "pion"}
    with pytest.raises(UserError, match=r"atlas-regular.*bad geometry override"):
        get_detector("atlas-regular", n_z=5)
    with pytest.raises(UserError, match="n_r must be an integer >= 1"):
        get_detector("atlas-regular", n_r=0)
    with pytest.raises(UserError, match="particle must be one of"):
        get_detector("atlas-regular", particle="kaon")
    with pytest.raises(UserError, match="r_max_mm must be a positive number"):
        get_detector("atlas-regular", r_max_mm=-1.0)


def test_a_search_space_may_shrink_the_binning() -> None:
    spec = load_spec("atlas_qvae_tiny")
    assert spec.detector == "atlas-regular" and spec.geometry == {"n_r": 6, "n_phi": 4}


def test_pion_showers_reach_every_layer_and_keep_the_energy_scale(detector: AtlasRegular, showers) -> None:
    cells = showers.cells["showers"].reshape(len(showers), 7, 14, 24)
    energy = showers.conditions["energy"]
    layer_fraction = (cells.sum(axis=(2, 3)) / energy[:, None]).mean(0)
    assert (layer_fraction > 0.002).all(), layer_fraction  # all seven layers see the pion
    total = cells.sum(axis=(1, 2, 3)) / energy
    assert 0.4 < float(np.median(total)) < 1.1  # h/e < 1 and leakage, no energy created
    assert (cells[cells > 0] >= 1.0).all()  # the 1 MeV readout threshold is applied
    # energy falls with radius: the innermost ring holds more than the outermost
    radial = cells.sum(axis=(0, 1, 2))
    assert radial[0] > 10 * radial[-1]
    np.testing.assert_array_equal(np.unique(energy), np.unique(energy[np.isin(energy, 2.0 ** np.arange(8, 23))]))


def test_photon_binning_leaves_the_back_tile_layers_nearly_empty() -> None:
    photons = get_detector("atlas-regular", particle="photon")
    sample = photons.synthesize(100, seed=3)
    cells = sample.cells["showers"].reshape(100, 7, -1)
    fraction = cells.sum(axis=2).sum(0) / cells.sum()
    assert fraction[:5].sum() > 0.99 and fraction[5:].sum() < 0.01


def test_files_are_in_calochallenge_layout(detector: AtlasRegular, showers, tmp_path: Path) -> None:
    path = tmp_path / "regular.h5"
    detector.write(path, showers)
    with h5py.File(path) as f:
        assert f["showers"].shape == (200, 2352) and f["showers"].dtype == np.float64
        assert f["incident_energies"].shape == (200, 1) and f["incident_energies"].dtype == np.float64
        assert f.attrs["detector"] == "atlas-regular"
    back = detector.read(path)
    np.testing.assert_array_equal(back.cells["showers"], showers.cells["showers"])
    small = get_detector("atlas-regular", n_r=6, n_phi=4)
    with pytest.raises(UserError, match=r"ATLAS regular binning .* expects 168 voxels"):
        small.read(path)


def test_scores_are_zero_on_itself_and_finite_against_another_seed(detector: AtlasRegular, showers) -> None:
    itself = detector.scores(showers, showers)
    assert itself["sep_mean"] == pytest.approx(0.0, abs=1e-12)
    other = detector.scores(showers, detector.synthesize(200, seed=8))
    assert all(math.isfinite(other[k]) for k in detector.objectives()), other
    assert other["sep_mean"] > 0 and other["fpd"] > itself["fpd"]


def test_cell_centres_locate_back_to_their_own_voxels(detector: AtlasRegular) -> None:
    centres = detector.cell_centres()["showers"]
    assert centres.shape == (2352, 3)
    part, cell = detector.locate(centres)
    assert (part == 0).all()
    np.testing.assert_array_equal(cell, np.arange(2352))
    r = np.hypot(centres[:, 0], centres[:, 1]).reshape(7, 14, 24)
    np.testing.assert_allclose(r[0, 0], np.arange(24) * 20.0 + 10.0, rtol=1e-6)


def test_geometry_dataclass_refuses_unknown_keys() -> None:
    with pytest.raises(UserError, match="unknown keys"):
        AtlasRegularGeometry.from_dict({"n_r": 4, "layers": 3})
