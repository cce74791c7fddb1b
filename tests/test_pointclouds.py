"""PointCloudSet: batches, subsets, the flat hits + offsets file layout and its validation."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.errors import UserError
from calotune.pointclouds import (
    PointCloudSet,
    read_point_cloud_conditions,
    read_point_clouds,
    write_point_cloud_stream,
    write_point_clouds,
)

COUNTS = [3, 0, 5, 1, 2]


@pytest.fixture()
def cloud() -> PointCloudSet:
    rng = np.random.default_rng(0)
    events = [np.column_stack([rng.normal(0, 50, (k, 3)), rng.exponential(10, k)]) for k in COUNTS]
    return PointCloudSet.from_events({"energy": np.arange(1.0, 6.0) * 1e3}, events, {"seed": 0})


def test_container(cloud: PointCloudSet) -> None:
    assert len(cloud) == 5 and cloud.counts.tolist() == COUNTS
    assert cloud.hits.dtype == np.float32 and cloud.offsets.dtype == np.int64
    sub = cloud.subset(np.array([2, 1, 0]))
    assert sub.counts.tolist() == [5, 0, 3]
    np.testing.assert_array_equal(sub.event(0), cloud.event(2))
    np.testing.assert_array_equal(cloud.subset(slice(1, 3)).conditions["energy"], [2e3, 3e3])
    np.testing.assert_allclose(cloud.total_energy()[2], cloud.event(2)[:, 3].sum(dtype=np.float64), rtol=1e-6)
    with pytest.raises(ValueError, match="offsets"):
        PointCloudSet({"energy": np.ones(2)}, np.zeros((3, 4)), np.array([0, 2, 1]))


def test_batch_arrays_pads_and_masks(cloud: PointCloudSet) -> None:
    batch = batch0 = cloud.batch_arrays(np.array([1, 2, 3]))
    hits, mask = batch["cells"]["hits"], batch["cells"]["mask"]
    assert hits.shape == (3, 5, 4) and hits.dtype == np.float32 and mask.dtype == bool
    assert mask.sum(axis=1).tolist() == [0, 5, 1]
    np.testing.assert_array_equal(hits[1], cloud.event(2))
    np.testing.assert_array_equal(hits[2, 0], cloud.event(3)[0])
    assert not hits[~mask].any()
    assert batch0["conditions"]["energy"].tolist() == [2e3, 3e3, 4e3]
    empty = cloud.batch_arrays([1])
    assert empty["cells"]["hits"].shape == (1, 1, 4) and not empty["cells"]["mask"].any()


def test_file_round_trip_and_prefix(cloud: PointCloudSet, tmp_path: Path) -> None:
    path = tmp_path / "pc.h5"
    write_point_clouds(path, cloud, detector_name="toy")
    back = read_point_clouds(path, detector_name="toy")
    np.testing.assert_array_equal(back.hits, cloud.hits)
    np.testing.assert_array_equal(back.offsets, cloud.offsets)
    np.testing.assert_array_equal(back.conditions["energy"], cloud.conditions["energy"])
    assert back.attrs["shower_kind"] == "points" and back.attrs["detector"] == "toy"
    head = read_point_clouds(path, max_events=3)
    assert head.counts.tolist() == COUNTS[:3] and len(head.hits) == sum(COUNTS[:3])
    assert len(read_point_cloud_conditions(path, max_events=2)["energy"]) == 2
    with pytest.raises(UserError, match="'other'"):
        read_point_clouds(path, detector_name="other")


def test_stream_equals_one_write(cloud: PointCloudSet, tmp_path: Path) -> None:
    n = write_point_cloud_stream(tmp_path / "s.h5", [cloud.subset(slice(0, 2)), cloud.subset(slice(2, None))])
    assert n == 5
    back = read_point_clouds(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.offsets, cloud.offsets)
    np.testing.assert_array_equal(back.hits, cloud.hits)


def _rewrite(path: Path, key: str, data: np.ndarray | None) -> None:
    with h5py.File(path, "r+") as f:
        del f[key]
        if data is not None:
            f.create_dataset(key, data=data)


@pytest.mark.parametrize(
    ("key", "change", "text"),
    [
        ("offsets", lambda c: None, "missing"),
        ("hits", lambda c: None, "missing"),
        ("hits", lambda c: c.hits[:, :3], "values per event"),
        ("hits", lambda c: np.where(np.arange(len(c.hits))[:, None] == 2, np.nan, c.hits), "NaN"),
        ("hits", lambda c: c.hits * np.array([1, 1, 1, -1], np.float32), "negative"),
        ("offsets", lambda c: c.offsets.astype(np.float64), "integer"),
        ("offsets", lambda c: np.array([0, 3, 2, 8, 9, 11]), "decreases"),
        ("offsets", lambda c: np.array([0, 3, 3, 8, 9, 10]), "ends at 10"),
        ("offsets", lambda c: np.array([1, 3, 3, 8, 9, 11]), "start at 0"),
        ("offsets", lambda c: c.offsets[:-1], r"N \+ 1 entries"),
    ],
)
def test_validation_names_file_and_key(cloud: PointCloudSet, tmp_path: Path, key: str, change, text: str) -> None:
    path = tmp_path / "bad.h5"
    write_point_clouds(path, cloud)
    _rewrite(path, key, change(cloud))
    with pytest.raises(UserError, match=text) as info:
        read_point_clouds(path)
    assert str(path) in str(info.value) and repr(key) in str(info.value)


def test_hit_count_limit(cloud: PointCloudSet, tmp_path: Path) -> None:
    path = tmp_path / "big.h5"
    write_point_clouds(path, cloud)
    with pytest.raises(UserError, match="event 2 has 5 items") as info:
        read_point_clouds(path, max_hits_per_event=4)
    assert "'offsets'" in str(info.value)


def test_write_refuses_negative_energy(cloud: PointCloudSet, tmp_path: Path) -> None:
    cloud.hits[0, 3] = -1.0
    with pytest.raises(UserError, match="negative"):
        write_point_clouds(tmp_path / "neg.h5", cloud)
    assert not (tmp_path / "neg.h5").exists()
