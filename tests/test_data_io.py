"""HDF5 reading/writing, the synthetic-sample cache and the ``python -m calotune.data`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import calotune
from calotune.data.cache import cached_synthetic
from calotune.data.hdf5 import atomic_write, open_checked, read_dataset
from calotune.detectors.zdc import ZDC
from calotune.errors import UserError
from calotune.showers import ShowerSet

N = 12
REPO = Path(calotune.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zdc() -> ZDC:
    return ZDC()


@pytest.fixture(scope="module")
def showers(zdc: ZDC) -> ShowerSet:
    return zdc.synthesize(N, seed=2, particle="neutron")


def _raw(showers: ShowerSet) -> dict[str, np.ndarray]:
    """The datasets of a valid ZDC file, for tests to corrupt one at a time."""
    return {
        "incident_energies": showers.conditions["energy"].reshape(-1, 1).copy(),
        "incident_theta": showers.conditions["theta"].reshape(-1, 1).copy(),
        "incident_phi": showers.conditions["phi"].reshape(-1, 1).copy(),
        "ecal": showers.cells["ecal"].copy(),
        "hcal": showers.cells["hcal"].copy(),
    }


def _write_raw(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, str] | None = None) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


# --- round trip ---------------------------------------------------------------------------


def test_write_read_round_trip(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    path = tmp_path / "sample.h5"
    zdc.write(path, showers)
    back = zdc.read(path)
    assert len(back) == N
    for name in ("energy", "theta", "phi"):
        np.testing.assert_array_equal(back.conditions[name], showers.conditions[name])
    for part in ("ecal", "hcal"):
        assert back.cells[part].dtype == np.float32
        np.testing.assert_array_equal(back.cells[part], showers.cells[part])
    assert back.attrs["detector"] == "zdc"
    assert back.attrs["particle"] == "neutron"
    assert back.attrs["seed"] == 2
    with h5py.File(path) as f:
        assert f["hcal"].compression == "gzip"
        assert f["incident_energies"].shape == (N, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["sample.h5"]  # no temporary left behind


def test_reader_accepts_float64_and_flat_conditions(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    data = {k: v.astype(np.float64) for k, v in _raw(showers).items()}
    data["incident_theta"] = data["incident_theta"].ravel()  # (N,) instead of (N, 1)
    back = zdc.read(_write_raw(tmp_path / "f64.h5", data))
    assert back.cells["hcal"].dtype == np.float32
    np.testing.assert_allclose(back.conditions["theta"], showers.conditions["theta"])


def test_write_refuses_negative_cells(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    bad = showers.subset(slice(None))
    bad.cells["ecal"] = bad.cells["ecal"].copy()
    bad.cells["ecal"][0, 0] = -1.0
    with pytest.raises(ValueError, match="ecal"):
        zdc.write(tmp_path / "bad.h5", bad)
    assert not (tmp_path / "bad.h5").exists()


# --- reader errors: each names the file and the key ---------------------------------------


def _drop(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda d: d.pop(key)


def _set(key: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict[str, np.ndarray]], None]:
    def corrupt(d: dict[str, np.ndarray]) -> None:
        d[key] = value(d[key])

    return corrupt


def _poke(key: str, value: float, where: tuple[int, int] = (3, 7)) -> Callable[[dict[str, np.ndarray]], None]:
    def corrupt(d: dict[str, np.ndarray]) -> None:
        d[key][where] = value

    return corrupt


READER_ERRORS = {
    "missing key": ("hcal", _drop("hcal"), ["incident_energies, incident_theta", "missing"]),
    "wrong width": ("hcal", _set("hcal", lambda a: a[:, :3500]), ["3500", "3600 (10 x 10 x 36)"]),
    "3-D cells": ("hcal", _set("hcal", lambda a: a.reshape(N, 36, 10, 10)), ["2-D", "flatten"]),
    "int dtype": ("ecal", _set("ecal", lambda a: a.astype(np.int32)), ["int32", "floating point"]),
    "string dtype": ("incident_theta", _set("incident_theta", lambda a: a.astype("S8")), ["floating point"]),
    "NaN": ("ecal", _poke("ecal", np.nan), ["NaN", "event 3, column 7"]),
    "Inf": ("incident_phi", _poke("incident_phi", np.inf, (4, 0)), ["NaN/Inf", "event 4"]),
    "negative": ("hcal", _poke("hcal", -2.5), ["1 negative", "-2.5", "event 3, column 7"]),
    "N mismatch": ("hcal", _set("hcal", lambda a: a[:-1]), [f"{N - 1} events", "'incident_energies' has"]),
    "zero energy": ("incident_energies", _poke("incident_energies", 0.0, (5, 0)), ["<= 0", "event 5"]),
    "empty": ("incident_energies", lambda d: d.update({k: v[:0] for k, v in d.items()}), ["0 events"]),
}


@pytest.mark.parametrize("case", list(READER_ERRORS))
def test_reader_errors_name_file_and_key(zdc: ZDC, showers: ShowerSet, tmp_path: Path, case: str) -> None:
    key, corrupt, fragments = READER_ERRORS[case]
    data = _raw(showers)
    corrupt(data)
    path = _write_raw(tmp_path / f"bad_{case.replace(' ', '_')}.h5", data)
    with pytest.raises(UserError) as info:
        zdc.read(path)
    message = str(info.value)
    assert path.name in message
    assert f"'{key}'" in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_reader_group_instead_of_dataset(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    data = _raw(showers)
    del data["ecal"]
    path = _write_raw(tmp_path / "group.h5", data)
    with h5py.File(path, "a") as f:
        f.create_group("ecal")
    with pytest.raises(UserError, match=r"group\.h5: key 'ecal' is an HDF5 group"):
        zdc.read(path)


def test_reader_refuses_other_detectors_file(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "other.h5", _raw(showers), {"detector": "calochallenge-2"})
    with pytest.raises(UserError, match=r"other\.h5: attribute 'detector' is 'calochallenge-2'"):
        zdc.read(path)


def test_width_error_points_at_file_geometry(showers: ShowerSet, tmp_path: Path) -> None:
    path = tmp_path / "nz36.h5"
    ZDC().write(path, showers)
    with pytest.raises(UserError, match=r"has 3600 cells per event .* 3500 .*hcal_nz=36"):
        ZDC(hcal_nz=35).read(path)


def test_missing_file(zdc: ZDC, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing\.h5: file not found"):
        zdc.read(tmp_path / "nothing.h5")


def test_not_hdf5(zdc: ZDC, tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("incident_energies,ecal,hcal\n1,2,3\n")
    with pytest.raises(UserError, match=r"notes\.h5: not an HDF5 file"):
        zdc.read(path)
    with pytest.raises(UserError, match="is a directory"):
        open_checked(tmp_path)


def test_read_dataset_generic_layout(tmp_path: Path) -> None:
    """The CaloChallenge-style layout goes through the same checks."""
    path = _write_raw(
        tmp_path / "cc.h5",
        {"incident_energies": np.full((4, 1), 1e3), "showers": np.ones((4, 368), np.float64)},
    )
    with h5py.File(path) as f:
        energies = read_dataset(f, "incident_energies", path, width=1, layout="1", strict=True)
        cells = read_dataset(f, "showers", path, width=368, layout="x", n_events=4, events_key="incident_energies")
        assert cells.dtype == np.float32 and cells.shape == (4, 368) and energies.shape == (4, 1)
        with pytest.raises(UserError, match="368 cells per event but ds1-pions has 533"):
            read_dataset(f, "showers", path, width=533, layout="ds1-pions has 533")


# --- atomic writes --------------------------------------------------------------------------


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "data.h5"
    atomic_write(path, {"x": np.arange(3.0)}, {"note": "first"})
    with pytest.raises(TypeError):
        atomic_write(path, {"x": np.array([object()], dtype=object)})
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["x"][()], np.arange(3.0))
        assert f.attrs["note"] == "first"


def test_atomic_write_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "data.h5"
    atomic_write(path, {"x": np.zeros((2, 2), np.float32)})
    assert path.is_file()


# --- cache ----------------------------------------------------------------------------------


def test_cached_synthetic_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detector = ZDC(hcal_nz=6)
    path = cached_synthetic(detector, 8, 1, tmp_path, particle="photon")
    assert path.parent == tmp_path and path.name.startswith("zdc-") and "particle=photon" in path.name
    assert len(detector.read(path)) == 8

    def fail(*args: object, **kwargs: object) -> ShowerSet:
        raise AssertionError("a cached sample must not be rebuilt")

    monkeypatch.setattr(detector, "synthesize", fail)
    assert cached_synthetic(detector, 8, 1, tmp_path, particle="photon") == path
    monkeypatch.undo()
    others = {
        cached_synthetic(detector, 8, 2, tmp_path, particle="photon"),
        cached_synthetic(detector, 8, 1, tmp_path, particle="neutron"),
        cached_synthetic(ZDC(hcal_nz=7), 8, 1, tmp_path, particle="photon"),
    }
    assert path not in others and len(others) == 3


# --- CLI ------------------------------------------------------------------------------------


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "calotune.data", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_synth_then_check(tmp_path: Path) -> None:
    out = tmp_path / "cli" / "zdc.h5"
    # --out in a folder that does not exist is refused before any work (a typo'd path
    # must not silently create a tree); once the folder exists the same command works
    missing = _cli("synth", "zdc", "--events", "40", "--seed", "3", "--out", out, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not out.parent.exists()
    out.parent.mkdir()
    synth = _cli(
        "synth",
        "zdc",
        "--events",
        "40",
        "--seed",
        "3",
        "--out",
        out,
        "--particle",
        "photon",
        "--mode",
        "pencil",
        cwd=tmp_path,
    )
    assert synth.returncode == 0, synth.stderr
    assert "wrote 40 zdc showers" in synth.stderr
    check = _cli("check", out, "--detector", "zdc", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "ok, zdc, 40 events" in check.stderr
    assert ZDC().read(out).attrs["mode"] == "pencil"


def test_cli_bad_file_exits_2_without_traceback(zdc: ZDC, showers: ShowerSet, tmp_path: Path) -> None:
    data = _raw(showers)
    data["hcal"] = data["hcal"][:, :100]
    bad = _write_raw(tmp_path / "bad.h5", data)
    result = _cli("check", bad, "--detector", "zdc", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "bad.h5" in result.stderr and "'hcal'" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = _cli("check", bad, "--detector", "no-such-detector", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown detector" in unknown.stderr
    assert "Traceback" not in unknown.stderr
