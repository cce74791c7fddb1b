"""Detector conformance: one suite every registered detector passes.

Every registered detector is tested, grid and point-cloud alike (a new one needs no
line here; ``EVENTS`` only shrinks the samples of the large ones): synthesis, file round
trip, validation errors (UserError naming file and key), scores at the floor and finite,
point-cloud round trip for grids.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.detectors import detector_names, get_detector
from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet, read_point_clouds, write_point_clouds
from calotune.showers import ShowerSet

#: registry name -> events per synthetic sample, where the default (120) is too slow on
#: 2 cores; every registered detector is a case.
EVENTS: dict[str, int] = {
    "calochallenge-1-photons": 150,
    "calochallenge-1-pions": 150,
    "calochallenge-2": 80,
    "calochallenge-3": 30,
}
CASES = detector_names()


def test_every_sized_detector_is_registered() -> None:
    assert set(EVENTS) <= set(CASES)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[Detector, ShowerSet]:
    detector = get_detector(request.param)
    return detector, detector.synthesize(EVENTS.get(request.param, 120), seed=3)


def _same(a: ShowerSet | PointCloudSet, b: ShowerSet | PointCloudSet) -> None:
    assert type(a) is type(b)
    assert list(a.conditions) == list(b.conditions)
    for name in a.conditions:
        np.testing.assert_array_equal(np.asarray(a.conditions[name], np.float32),
                                      np.asarray(b.conditions[name], np.float32))
    if isinstance(a, PointCloudSet):
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.hits, b.hits)
        return
    assert set(a.cells) == set(b.cells)
    for part in a.cells:
        np.testing.assert_array_equal(a.cells[part], b.cells[part])


def test_interface(case: tuple[Detector, ShowerSet]) -> None:
    detector, showers = case
    assert detector.shower_kind in ("grid", "points")
    assert isinstance(showers, PointCloudSet if detector.shower_kind == "points" else ShowerSet)
    assert detector.conditions[0] == "energy"
    assert list(showers.conditions) == list(detector.conditions)
    metric, mode = detector.default_objective()
    assert detector.objectives()[metric] == mode and mode in ("min", "max")
    assert type(detector).from_geometry(detector.geometry_dict()).geometry_dict() == detector.geometry_dict()


def test_synthesis_is_reproducible_and_physical(case: tuple[Detector, ShowerSet]) -> None:
    detector, showers = case
    again = detector.synthesize(len(showers), seed=3)
    _same(showers, again)
    if isinstance(showers, PointCloudSet):
        assert detector.parts == ("hits",)
        assert np.isfinite(showers.hits).all() and (showers.hits[:, 3] >= 0).all()
        assert (showers.counts > 0).all() and 4 * showers.counts.max() <= detector.part_sizes["hits"]
        assert (showers.total_energy() > 0).all()
        return
    for part, width in detector.part_sizes.items():
        cells = showers.cells[part]
        assert cells.shape == (len(showers), width)
        assert np.isfinite(cells).all() and (cells >= 0).all()
    assert (showers.total_energy() > 0).all()


def test_write_read_identical(case: tuple[Detector, ShowerSet | PointCloudSet], tmp_path: Path) -> None:
    detector, showers = case
    path = tmp_path / "sample.h5"
    detector.write(path, showers)
    _same(showers, detector.read(path))
    assert detector.write_stream(tmp_path / "stream.h5", [showers.subset(slice(0, 7)),
                                                         showers.subset(slice(7, None))]) == len(showers)
    _same(showers, detector.read(tmp_path / "stream.h5"))
    conditions = detector.read_conditions(path, max_events=5)
    assert len(conditions["energy"]) == 5


def _corrupt(path: Path, key: str, how: str) -> None:
    with h5py.File(path, "r+") as f:
        data = f[key][()]
        del f[key]
        if how == "missing":
            return
        if how == "width":
            data = np.concatenate([data, data[:, :1]], axis=1)
        elif how == "nan":
            data[1, 0] = np.nan
        f.create_dataset(key, data=data)


@pytest.mark.parametrize("how", ["missing", "width", "nan"])
def test_validation_errors_name_file_and_key(case: tuple[Detector, ShowerSet], tmp_path: Path, how: str) -> None:
    detector, showers = case
    path = tmp_path / f"bad_{how}.h5"
    detector.write(path, showers.subset(slice(0, 6)))
    key = detector.parts[0]
    _corrupt(path, key, how)
    with pytest.raises(UserError) as info:
        detector.read(path)
    message = str(info.value)
    assert str(path) in message and repr(key) in message, message


def test_scores_floor_and_finite(case: tuple[Detector, ShowerSet]) -> None:
    detector, showers = case
    metric, _ = detector.default_objective()
    itself = detector.scores(showers, showers)
    assert set(detector.objectives()) <= set(itself)
    assert itself[metric] == pytest.approx(0.0, abs=1e-9)
    other = detector.synthesize(len(showers), seed=4)
    scores = detector.scores(showers, other)
    assert all(math.isfinite(scores[k]) for k in detector.objectives()), scores
    assert scores[metric] > itself[metric]


def test_point_cloud_round_trip_exact(case: tuple[Detector, ShowerSet], tmp_path: Path) -> None:
    detector, showers = case
    if detector.shower_kind != "grid":
        pytest.skip("point-cloud detectors hold hits already")
    cloud = detector.to_point_cloud(showers)
    assert len(cloud) == len(showers)
    assert cloud.counts.tolist() == sum((showers.cells[p] != 0).sum(axis=1) for p in detector.parts).tolist()
    np.testing.assert_allclose(cloud.total_energy(), showers.total_energy(), rtol=1e-5)
    back = detector.voxelise(cloud)
    _same(showers, back)
    path = tmp_path / "points.h5"
    keys = getattr(detector, "condition_keys", {"energy": "incident_energies"})
    write_point_clouds(path, cloud, keys, detector_name=detector.name)
    read = read_point_clouds(path, keys, detector_name=detector.name)
    assert list(read.conditions) == list(detector.conditions)
    np.testing.assert_array_equal(read.hits, cloud.hits)
    np.testing.assert_array_equal(read.offsets, cloud.offsets)
    for part in detector.parts:
        np.testing.assert_array_equal(detector.voxelise(read).cells[part], showers.cells[part])
