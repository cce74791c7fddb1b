"""ZDC geometry and parametrised showers: layout, validation and physics sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calotune.detectors import get_detector
from calotune.detectors.zdc import ZDC, ZDCGeometry
from calotune.errors import UserError
from calotune.showers import ShowerSet

N = 300


@pytest.fixture(scope="module")
def zdc() -> ZDC:
    return ZDC()


@pytest.fixture(scope="module")
def neutrons(zdc: ZDC) -> ShowerSet:
    return zdc.synthesize(N, seed=11, particle="neutron", mode="full")


@pytest.fixture(scope="module")
def photons(zdc: ZDC) -> ShowerSet:
    return zdc.synthesize(N, seed=12, particle="photon", mode="full")


@pytest.fixture(scope="module")
def pencil_neutrons(zdc: ZDC) -> ShowerSet:
    return zdc.synthesize(N, seed=13, particle="neutron", mode="pencil")


def _fractions(showers: ShowerSet) -> tuple[np.ndarray, np.ndarray]:
    ecal = showers.cells["ecal"].sum(axis=1, dtype=np.float64)
    hcal = showers.cells["hcal"].sum(axis=1, dtype=np.float64)
    return ecal / (ecal + hcal), hcal / (ecal + hcal)


# --- geometry -------------------------------------------------------------------------


def test_default_cell_counts() -> None:
    g = ZDCGeometry()
    assert (g.n_ecal, g.n_hcal) == (400, 3600)
    assert ZDC().part_sizes == {"ecal": 400, "hcal": 3600}


def test_registry_passes_geometry_overrides() -> None:
    detector = get_detector("zdc", hcal_nz=10, ecal_nx=4)
    assert detector.part_sizes == {"ecal": 4 * 20, "hcal": 1000}
    with pytest.raises(UserError, match="bogus"):
        get_detector("zdc", bogus=1)


@pytest.mark.parametrize(
    ("field", "value"), [("hcal_nz", 0), ("hcal_nx", 2.5), ("ecal_cell_mm", -1.0), ("hcal_sampling_fraction", 2.0)]
)
def test_geometry_rejects_impossible_values(field: str, value: float) -> None:
    with pytest.raises(UserError, match=field):
        ZDCGeometry(**{field: value})


def test_geometry_json_round_trip() -> None:
    detector = ZDC(hcal_nz=12, ecal_cell_mm=25)  # an int for a float field is normalised
    data = json.loads(json.dumps(detector.geometry_dict()))
    assert data["ecal_cell_mm"] == 25.0 and isinstance(data["ecal_cell_mm"], float)
    rebuilt = ZDC.from_geometry(data)
    assert rebuilt.geometry == detector.geometry
    assert rebuilt.part_sizes["hcal"] == 1200
    with pytest.raises(UserError, match="unknown field"):
        ZDC.from_geometry({**data, "hcal_colour": "red"})


def test_coordinate_helpers() -> None:
    g = ZDCGeometry()
    for centres, n, pitch in [
        (g.ecal_x_centres(), g.ecal_nx, g.ecal_cell_mm),
        (g.ecal_y_centres(), g.ecal_ny, g.ecal_cell_mm),
        (g.hcal_x_centres(), g.hcal_nx, g.hcal_cell_mm),
        (g.hcal_y_centres(), g.hcal_ny, g.hcal_cell_mm),
    ]:
        assert centres.shape == (n,)
        np.testing.assert_allclose(np.diff(centres), pitch)
        assert centres.sum() == pytest.approx(0.0, abs=1e-9)  # centred on the beam axis
        assert centres[-1] + pitch / 2 == pytest.approx(n * pitch / 2)
    z = g.hcal_z_centres()
    assert z.shape == (g.hcal_nz,)
    assert z[0] == pytest.approx(g.ecal_depth_mm + g.hcal_layer_mm / 2)
    np.testing.assert_allclose(np.diff(z), g.hcal_layer_mm)


def test_hcal_threshold_in_stored_units() -> None:
    g = ZDCGeometry(hcal_threshold_visible_mev=0.5, hcal_sampling_fraction=0.025)
    assert g.hcal_threshold_mev == pytest.approx(20.0)


# --- synthetic showers ------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["neutrons", "photons", "pencil_neutrons"])
def test_synthetic_arrays_are_valid(sample: str, request: pytest.FixtureRequest) -> None:
    showers: ShowerSet = request.getfixturevalue(sample)
    assert set(showers.conditions) == {"energy", "theta", "phi"}
    assert showers.cells["ecal"].shape == (N, 400)
    assert showers.cells["hcal"].shape == (N, 3600)
    for array in [*showers.conditions.values(), *showers.cells.values()]:
        assert array.dtype == np.float32
        assert np.isfinite(array).all()
    for cells in showers.cells.values():
        assert (cells >= 0).all()
    assert (showers.total_energy() > 0).all()


def test_readout_threshold_is_applied(neutrons: ShowerSet) -> None:
    g = ZDCGeometry()
    for part, threshold in [("ecal", g.ecal_threshold_mev), ("hcal", g.hcal_threshold_mev)]:
        cells = neutrons.cells[part]
        hit = cells[cells > 0]
        assert hit.min() >= threshold * (1 - 1e-6)
        assert (cells == 0).mean() > 0.5  # most cells see no hit, as in the ZDC group's data


def test_same_seed_same_showers_other_seed_other_showers(zdc: ZDC) -> None:
    a = zdc.synthesize(20, seed=5, particle="photon")
    b = zdc.synthesize(20, seed=5, particle="photon")
    c = zdc.synthesize(20, seed=6, particle="photon")
    for part in ("ecal", "hcal"):
        np.testing.assert_array_equal(a.cells[part], b.cells[part])
        assert not np.array_equal(a.cells[part], c.cells[part])
    np.testing.assert_array_equal(a.conditions["energy"], b.conditions["energy"])


@pytest.mark.parametrize("sample", ["neutrons", "photons", "pencil_neutrons"])
def test_no_two_showers_are_identical(sample: str, request: pytest.FixtureRequest) -> None:
    showers: ShowerSet = request.getfixturevalue(sample)
    cells = np.concatenate([showers.cells["ecal"], showers.cells["hcal"]], axis=1)
    assert len(np.unique(cells, axis=0)) == N


def test_neutrons_deposit_mostly_in_hcal(neutrons: ShowerSet) -> None:
    _, hcal_fraction = _fractions(neutrons)
    assert 0.90 <= hcal_fraction.mean() <= 0.98
    assert hcal_fraction.std() > 0.02  # EM-fraction and start-depth fluctuations are visible


def test_photons_deposit_mostly_in_ecal(photons: ShowerSet) -> None:
    ecal_fraction, _ = _fractions(photons)
    assert ecal_fraction.mean() > 0.6
    # an EM shower is almost fully visible; a hadronic one loses energy to h/e and leakage
    response = photons.total_energy() / photons.conditions["energy"]
    assert 0.9 < response.mean() < 1.02


def test_deposit_follows_incident_energy(neutrons: ShowerSet, photons: ShowerSet) -> None:
    for showers in (neutrons, photons):
        assert np.corrcoef(showers.total_energy(), showers.conditions["energy"])[0, 1] > 0.9


def test_energy_ranges_and_angles(neutrons: ShowerSet, pencil_neutrons: ShowerSet) -> None:
    g = ZDCGeometry()
    full_e, pencil_e = neutrons.conditions["energy"], pencil_neutrons.conditions["energy"]
    assert full_e.min() >= 1e3 and full_e.max() <= 300e3 and full_e.max() > 250e3
    assert pencil_e.min() >= 50e3 and pencil_e.max() <= 250e3
    # pencil: on axis; full coverage: a spread of mrad angles, every phi, inside the face
    assert pencil_neutrons.conditions["theta"].max() < 1e-3
    theta, phi = neutrons.conditions["theta"], neutrons.conditions["phi"]
    assert theta.max() > 10 * pencil_neutrons.conditions["theta"].max()
    impact = g.distance_mm * np.tan(theta.astype(np.float64))
    assert impact.max() < g.hcal_nx * g.hcal_cell_mm / 2
    assert phi.min() < -2.5 and phi.max() > 2.5


def test_hcal_longitudinal_profile_rises_then_falls(pencil_neutrons: ShowerSet) -> None:
    g = ZDCGeometry()
    profile = pencil_neutrons.cells["hcal"].reshape(N, g.hcal_nz, -1).sum(axis=2).mean(axis=0)
    peak = int(np.argmax(profile))
    assert 1 <= peak <= g.hcal_nz - 2
    assert profile[peak] > 1.3 * profile[0]
    assert profile[peak] > 2.0 * profile[-1]


def test_hadron_showers_are_wider_than_photon_showers(pencil_neutrons: ShowerSet, zdc: ZDC) -> None:
    g = zdc.geometry
    photons = zdc.synthesize(100, seed=3, particle="photon", mode="pencil")

    def rms_width(showers: ShowerSet) -> float:
        x_energy = showers.cells["hcal"].reshape(len(showers), g.hcal_nz, g.hcal_nx, g.hcal_ny)
        x_energy = x_energy.sum(axis=(1, 3), dtype=np.float64)
        x = g.hcal_x_centres()
        total = x_energy.sum(axis=1) + 1e-16
        mean = x_energy @ x / total
        return float(np.sqrt(np.maximum(x_energy @ x**2 / total - mean**2, 0)).mean())

    neutron_width = rms_width(pencil_neutrons)
    assert 0.15 * g.hcal_lambda_mm < neutron_width < g.hcal_lambda_mm  # ~ interaction length
    assert neutron_width > 1.5 * rms_width(photons)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"particle": "pion"}, "particle"),
        ({"mode": "wide"}, "mode"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_synthesize_rejects_bad_options(zdc: ZDC, kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        zdc.synthesize(5, seed=0, **kwargs)


def test_synthesize_rejects_no_events(zdc: ZDC) -> None:
    with pytest.raises(UserError, match=">= 1"):
        zdc.synthesize(0, seed=0)


def test_smaller_geometry_synthesizes(zdc: ZDC) -> None:
    small = ZDC(hcal_nz=8, ecal_nx=6, ecal_ny=5)
    showers = small.synthesize(10, seed=1, particle="photon")
    assert showers.cells["hcal"].shape == (10, 800)
    assert showers.cells["ecal"].shape == (10, 30)
