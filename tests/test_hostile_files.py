"""Hostile inputs and failing outputs: every class must end as one ``error:`` line, exit 2.

Classes (see calotune.data.hdf5): an output that is also an input; untrusted HDF5 files;
untrusted model folders; requests too large to hold; writes that fail (EFBIG for real,
through RLIMIT_FSIZE); writers that are SIGKILLed mid-write. Files, processes and signals
are real; only the "available memory" of one test is narrowed in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calotune.artifacts import load_model, read_description, save_model
from calotune.data import hdf5
from calotune.data.__main__ import main as data_main
from calotune.data.hdf5 import StreamWriter, atomic_write, remove_stale_temporaries
from calotune.detectors.calochallenge import dataset_1_photons
from calotune.detectors.zdc import ZDC
from calotune.errors import UserError
from calotune.evaluate import main as evaluate_main
from calotune.generate import main as generate_main
from calotune.models.registry import build_model
from calotune.sampling import generate
from calotune.showers import ShowerSet

REPO = Path(__file__).resolve().parent.parent
N = 30
PARAMS = {"hidden_width": 16, "low_rank": 2, "critic_width": 16}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(err: str, *needles: str, progress: bool = False) -> str:
    """The single ``error:`` line; ``progress`` allows INFO lines logged before the failure."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if progress:
        lines = [ln for ln in lines if " INFO " not in ln and not ln.startswith("INFO ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _run(args: list[str], cwd: Path, preexec=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


@pytest.fixture(scope="module")
def zdc() -> ZDC:
    return ZDC()


@pytest.fixture(scope="module")
def sample(zdc: ZDC) -> ShowerSet:
    return zdc.synthesize(N, seed=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, zdc: ZDC, sample: ShowerSet) -> Path:
    """A folder holding ref.h5 (N zdc events) and model/ (a small zdc_swiglu)."""
    root = tmp_path_factory.mktemp("hostile")
    zdc.write(root / "ref.h5", sample)
    torch.manual_seed(0)
    model = build_model("zdc_swiglu", PARAMS, zdc)
    save_model(root / "model", model, family="zdc_swiglu", detector=zdc, params=PARAMS)
    return root


# ================================================================ 1. output is an input


@pytest.mark.parametrize("spelling", ["same", "dotdot", "absolute", "symlink", "hardlink"])
def test_generate_refuses_out_that_is_the_conditions_file(workdir: Path, spelling: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    ref = workdir / "ref.h5"
    before = _sha(ref)
    (workdir / "sub").mkdir(exist_ok=True)
    out = {"same": "ref.h5", "dotdot": "sub/../ref.h5", "absolute": str(ref)}.get(spelling)
    if spelling == "symlink":
        out = str(tmp_path / "link.h5")
        os.symlink(ref, out)
    elif spelling == "hardlink":
        out = str(tmp_path / "hard.h5")
        os.link(ref, out)
    code = generate_main(["model", "--conditions", "ref.h5", "--out", out, "--events", "5"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--out", "--conditions", "ref.h5")
    assert _sha(ref) == before
    assert _hidden(workdir) == []


@pytest.mark.parametrize("name", ["model.json", "weights.pt"])
def test_generate_refuses_out_that_is_a_model_file(workdir: Path, name: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    target = workdir / "model" / name
    before = _sha(target)
    code = generate_main([str(workdir / "model"), "--out", str(workdir / "model" / ".." / "model" / name),
                          "--events", "5"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--out", name)
    assert _sha(target) == before


@pytest.mark.parametrize("case", ["folder", "missing_parent", "device", "not_a_folder_parent"])
def test_out_refused_before_any_work(workdir: Path, tmp_path: Path, case: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")  # a special file; never /dev/null: old code would replace it
    out = {"folder": tmp_path, "missing_parent": tmp_path / "no" / "such" / "o.h5", "device": tmp_path / "fifo",
           "not_a_folder_parent": tmp_path / "file" / "o.h5"}[case]
    start = time.perf_counter()
    assert data_main(["synth", "zdc", "--events", "5", "--seed", "1", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "--out")
    assert generate_main([str(workdir / "model"), "--out", str(out), "--events", "5"]) == 2
    _one_error_line(capsys.readouterr().err, "--out")
    assert time.perf_counter() - start < 30  # refused up front, nothing synthesised
    assert (tmp_path / "fifo").is_fifo() and _hidden(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_unwritable_folder_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert data_main(["synth", "zdc", "--events", "5", "--seed", "1", "--out", str(locked / "o.h5")]) == 2
    _one_error_line(capsys.readouterr().err, "permission")


@pytest.mark.parametrize("flag", ["--json", "--plots"])
@pytest.mark.parametrize("which", ["generated", "reference"])
def test_evaluate_refuses_outputs_that_are_inputs(workdir: Path, tmp_path: Path, flag: str, which: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    gen, ref = tmp_path / "gen.h5", tmp_path / "ref.h5"
    gen.write_bytes((workdir / "ref.h5").read_bytes())
    ref.write_bytes((workdir / "ref.h5").read_bytes())
    target = gen if which == "generated" else ref
    link = tmp_path / "alias.h5"
    os.symlink(target, link)
    before = _sha(target)
    for out in (target, link, tmp_path / "." / target.name):
        code = evaluate_main([str(gen), "--reference", str(ref), "--dataset", "zdc", flag, str(out)])
        assert code == 2
        _one_error_line(capsys.readouterr().err, flag, "same")  # refused as an input, before any work
        assert _sha(target) == before


# ================================================================ 2. untrusted HDF5


def _valid(path: Path, sample: ShowerSet, **overrides) -> Path:
    """A zdc file whose datasets are replaced by ``overrides`` (key -> callable(f, key))."""
    data = {
        "incident_energies": sample.conditions["energy"].reshape(-1, 1),
        "incident_theta": sample.conditions["theta"].reshape(-1, 1),
        "incident_phi": sample.conditions["phi"].reshape(-1, 1),
        "ecal": sample.cells["ecal"],
        "hcal": sample.cells["hcal"],
    }
    with h5py.File(path, "w", libver="latest") as f:  # dense attributes may exceed 64 kB
        for key, value in data.items():
            if key in overrides:
                overrides[key](f, key)
            else:
                f.create_dataset(key, data=value, compression="gzip", chunks=(5, value.shape[1]))
    return path


def _corrupt_chunk(path: Path, key: str) -> Path:
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * min(info.size, 64))
    return path


HOSTILE = {
    "corrupt_chunk": ("hcal", lambda p, s: _corrupt_chunk(_valid(p, s), "hcal")),
    "soft_link_nowhere": ("ecal", lambda p, s: _valid(
        p, s, ecal=lambda f, k: f.__setitem__(k, h5py.SoftLink("/gone")))),
    "external_link_nowhere": ("hcal", lambda p, s: _valid(
        p, s, hcal=lambda f, k: f.__setitem__(k, h5py.ExternalLink("missing.h5", "/hcal")))),
    "declared_far_beyond_stored": ("incident_energies", lambda p, s: _valid(p, s, incident_energies=lambda f, k: (
        f.create_dataset(k, shape=(10**11, 1), dtype="f4", chunks=(1 << 16, 1), compression="gzip")))),
    "all_rows_declared_far_beyond_stored": ("incident_energies", lambda p, s: _huge_rows(p, s)),
    "scalar_0d": ("ecal", lambda p, s: _valid(p, s, ecal=lambda f, k: f.create_dataset(k, data=1.0))),
    "three_d": ("ecal", lambda p, s: _valid(p, s, ecal=lambda f, k: f.create_dataset(k, data=np.zeros((N, 20, 20))))),
    "compound": ("incident_theta", lambda p, s: _valid(p, s, incident_theta=lambda f, k: f.create_dataset(
        k, data=np.zeros(N, dtype=[("a", "f4"), ("b", "f4")])))),
    "strings": ("incident_phi", lambda p, s: _valid(p, s, incident_phi=lambda f, k: f.create_dataset(
        k, data=np.array([b"x"] * N)))),
    "objects_vlen": ("incident_phi", lambda p, s: _valid(p, s, incident_phi=lambda f, k: f.create_dataset(
        k, data=["a"] * N, dtype=h5py.string_dtype()))),
    "null_dataspace": ("ecal", lambda p, s: _valid(p, s, ecal=lambda f, k: f.create_dataset(
        k, data=h5py.Empty("f4")))),
    "group": ("hcal", lambda p, s: _valid(p, s, hcal=lambda f, k: f.create_group(k))),
    "huge_chunk": ("incident_energies", lambda p, s: _valid(p, s, incident_energies=lambda f, k: f.create_dataset(
        k, shape=(N, 1), maxshape=(None, 1), dtype="f4", chunks=(1 << 29, 1), data=s.conditions["energy"][:, None]))),
    "huge_detector_attr": ("detector", lambda p, s: _attr(_valid(p, s), "detector", "zdc" + "x" * 200_000)),
    "array_detector_attr": ("detector", lambda p, s: _attr(_valid(p, s), "detector", np.arange(5))),
    "truncated": ("", lambda p, s: _truncate(_valid(p, s))),
}


def _huge_rows(path: Path, sample: ShowerSet) -> Path:
    """Every dataset declares 10^9 rows (consistent) but stores only N."""
    with h5py.File(path, "w") as f:
        for key, width in (("incident_energies", 1), ("incident_theta", 1), ("incident_phi", 1),
                           ("ecal", 400), ("hcal", 3600)):
            ds = f.create_dataset(key, shape=(10**9, width), dtype="f4", chunks=(16, width), compression="gzip")
            ds[:N] = np.ones((N, width), np.float32)
    return path


def _attr(path: Path, name: str, value) -> Path:
    with h5py.File(path, "a", libver="latest") as f:
        f.attrs[name] = value
    return path


def _truncate(path: Path) -> Path:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_hdf5_is_one_user_error(case: str, sample: ShowerSet, zdc: ZDC, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    key, make = HOSTILE[case]
    path = make(tmp_path / f"{case}.h5", sample)
    with pytest.raises(UserError) as info:
        zdc.read(path)
    message = str(info.value)
    assert f"{case}.h5" in message and (not key or repr(key) in message), message
    assert "\n" not in message
    # the same file through the command line: one line, exit 2
    assert data_main(["check", str(path), "--detector", "zdc"]) == 2
    _one_error_line(capsys.readouterr().err, f"{case}.h5")


def test_unused_odd_attributes_are_skipped(sample: ShowerSet, zdc: ZDC, tmp_path: Path) -> None:
    path = _valid(tmp_path / "odd.h5", sample)
    with h5py.File(path, "a", libver="latest") as f:  # dense attribute storage: no 64 kB cap
        f.attrs["notes"] = np.zeros(100_000)  # 800 kB: never read
        f.attrs["pairs"] = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
    back = zdc.read(path)
    assert "notes" not in back.attrs and "pairs" not in back.attrs and len(back) == N


def test_hostile_calochallenge_files(tmp_path: Path) -> None:
    det = dataset_1_photons()
    cases = {
        "chunk": lambda f: (f.create_dataset("incident_energies", data=np.ones((4, 1))),
                            f.create_dataset("showers", data=np.ones((4, 368)), chunks=(1, 368),
                                             compression="gzip")),
        "soft": lambda f: (f.create_dataset("incident_energies", data=np.ones((4, 1))),
                           f.__setitem__("showers", h5py.SoftLink("/nowhere"))),
        "huge": lambda f: (f.create_dataset("incident_energies", shape=(10**10, 1), dtype="f4", chunks=(4096, 1)),
                           f.create_dataset("showers", shape=(10**10, 368), dtype="f4", chunks=(8, 368))),
    }
    for name, build in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            build(f)
        if name == "chunk":
            _corrupt_chunk(path, "showers")
        with pytest.raises(UserError, match=rf"{name}\.h5: key '(showers|incident_energies)'"):
            det.read(path)
        with pytest.raises(UserError, match=rf"{name}\.h5"):
            det.read(path, max_events=2)


def test_result_larger_than_memory_is_refused_before_allocating(sample: ShowerSet, zdc: ZDC, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = _valid(tmp_path / "ok.h5", sample)
    monkeypatch.setattr(hdf5, "available_memory", lambda: 10_000)
    with pytest.raises(UserError, match=r"ok\.h5: key '.*'.*memory"):
        zdc.read(path)


def test_block_reads_match_whole_reads(sample: ShowerSet, zdc: ZDC, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = _valid(tmp_path / "ok.h5", sample)
    monkeypatch.setattr(hdf5, "READ_BLOCK_BYTES", 1)  # one chunk (5 rows) per read
    back = zdc.read(path)
    np.testing.assert_array_equal(back.cells["hcal"], sample.cells["hcal"])
    assert len(zdc.read(path, max_events=7)) == 7


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.floats(0.0, 1.0), length=st.integers(1, 256), byte=st.integers(0, 255),
       cut=st.one_of(st.none(), st.floats(0.05, 0.99)))
def test_random_damage_never_escapes_as_a_traceback(offset: float, length: int, byte: int, cut: float | None,
                                                    sample: ShowerSet, zdc: ZDC,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _valid(tmp_path_factory.mktemp("fuzz") / "fuzz.h5", sample)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(int(offset * (size - 1)))
        fh.write(bytes([byte]) * length)
        if cut is not None:
            fh.truncate(int(cut * size))
    try:
        back = zdc.read(path)
    except UserError as exc:
        assert "fuzz.h5" in str(exc)
    else:
        assert len(back) == N


# ================================================================ 3. untrusted model folders


def _model_copy(workdir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model.json", "weights.pt"):
        (folder / name).write_bytes((workdir / "model" / name).read_bytes())
    return folder


def _edit(folder: Path, change) -> None:
    description = json.loads((folder / "model.json").read_text())
    change(description)
    (folder / "model.json").write_text(json.dumps(description))


DESCRIPTIONS = {
    "missing_family": ("family", lambda d: d.pop("family")),
    "missing_params": ("params", lambda d: d.pop("params")),
    "missing_geometry": ("geometry", lambda d: d.pop("geometry")),
    "geometry_string": ("geometry", lambda d: d.__setitem__("geometry", "x")),
    "params_list": ("params", lambda d: d.__setitem__("params", [1])),
    "detector_number": ("detector", lambda d: d.__setitem__("detector", 5)),
    "unknown_family": ("family", lambda d: d.__setitem__("family", "gan9000")),
    "unknown_detector": ("detector", lambda d: d.__setitem__("detector", "atlas")),
    "param_refused": ("params", lambda d: d["params"].__setitem__("hidden_width", -3)),
    "param_wrong_type": ("params", lambda d: d["params"].__setitem__("hidden_width", "wide")),
    "param_unknown": ("params", lambda d: d["params"].__setitem__("bogus", 1)),
    "param_enormous": ("params", lambda d: d["params"].__setitem__("hidden_width", 10**7)),
    "geometry_refused": ("geometry", lambda d: d["geometry"].__setitem__("ecal_nx", 0)),
    "geometry_unknown_field": ("geometry", lambda d: d["geometry"].__setitem__("bogus", 1)),
    "geometry_other_width": ("", lambda d: d["geometry"].__setitem__("ecal_nx", 21)),
}


@pytest.mark.parametrize("case", sorted(DESCRIPTIONS))
def test_bad_model_json_is_one_user_error(case: str, workdir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key, change = DESCRIPTIONS[case]
    folder = _model_copy(workdir, tmp_path)
    _edit(folder, change)
    with pytest.raises(UserError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder) in message and (not key or repr(key) in message), message
    assert generate_main([str(folder), "--out", str(tmp_path / "g.h5"), "--events", "3"]) == 2
    _one_error_line(capsys.readouterr().err, str(folder))
    assert not (tmp_path / "g.h5").exists()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100_000,
                                     b" " * (2 << 20) + b"{}"])
def test_unreadable_model_json(content: bytes, workdir: Path, tmp_path: Path) -> None:
    folder = _model_copy(workdir, tmp_path)
    (folder / "model.json").write_bytes(content)
    with pytest.raises(UserError, match=r"model\.json"):
        read_description(folder)


def _weights(folder: Path, workdir: Path, case: str) -> None:
    path = folder / "weights.pt"
    state = torch.load(workdir / "model" / "weights.pt", weights_only=True)
    first = next(iter(state))
    if case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(4096))
    elif case == "wrong_shape":
        state[first] = torch.zeros(3, 3)
        torch.save(state, path)
    elif case == "wrong_dtype":
        state[first] = state[first].double()
        torch.save(state, path)
    elif case == "missing_tensor":
        state.pop(first)
        torch.save(state, path)
    elif case == "extra_tensor":
        state["bogus"] = torch.zeros(1)
        torch.save(state, path)
    elif case == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif case == "huge_sparse":
        with open(path, "r+b") as fh:
            fh.truncate(50 << 30)  # 50 GiB of holes: never read


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage", "wrong_shape", "wrong_dtype",
                                  "missing_tensor", "extra_tensor", "not_a_dict", "huge_sparse"])
def test_bad_weights_are_one_user_error(case: str, workdir: Path, tmp_path: Path) -> None:
    folder = _model_copy(workdir, tmp_path)
    _weights(folder, workdir, case)
    with pytest.raises(UserError, match=r"weights\.pt"):
        load_model(folder)


def test_bad_model_in_a_real_process(workdir: Path, tmp_path: Path) -> None:
    folder = _model_copy(workdir, tmp_path)
    _weights(folder, workdir, "truncated")
    proc = _run(["-m", "calotune.generate", str(folder), "--out", "g.h5", "--events", "3"], tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "weights.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ================================================================ 4. large requests


@pytest.mark.parametrize("args", [["--events", "1000000000"], ["--events", "0"], ["--events", "-4"],
                                  ["--batch-size", "0"], ["--batch-size", "-1"]])
def test_generate_refuses_impossible_sizes(args: list[str], workdir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.h5"
    code = generate_main([str(workdir / "model"), "--out", str(out), *(["--events", "5"] if "--events" not in args
                                                                       else []), *args])
    assert code == 2
    _one_error_line(capsys.readouterr().err, args[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("events", ["1000000000", "0"])
def test_synth_refuses_impossible_sizes(events: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["synth", "zdc", "--events", events, "--seed", "1", "--out", str(tmp_path / "s.h5")]) == 2
    line = _one_error_line(capsys.readouterr().err, "--events")
    if events != "0":
        assert "at most" in line
    assert list(tmp_path.iterdir()) == []


def test_generate_streams_batches_into_the_detector_layout(workdir: Path, tmp_path: Path, zdc: ZDC,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    appended: list[int] = []
    real_append = StreamWriter.append

    def spy(self: StreamWriter, datasets: dict) -> None:
        appended.append(len(next(iter(datasets.values()))))
        real_append(self, datasets)

    monkeypatch.setattr(StreamWriter, "append", spy)
    out = tmp_path / "g.h5"
    assert generate_main([str(workdir / "model"), "--conditions", str(workdir / "ref.h5"), "--out", str(out),
                          "--events", "25", "--batch-size", "10", "--seed", "4"]) == 0
    assert appended == [10, 10, 5]  # one batch in memory at a time
    back = zdc.read(out)
    model, _, _ = load_model(workdir / "model")
    reference = zdc.read(workdir / "ref.h5").subset(slice(0, 25))
    expected, _ = generate(model, reference.conditions, batch_size=10, seed=4)
    for part in ("ecal", "hcal"):
        np.testing.assert_array_equal(back.cells[part], expected.cells[part])
    np.testing.assert_array_equal(back.conditions["energy"], reference.conditions["energy"])
    with h5py.File(out) as f:
        assert f["hcal"].maxshape == (None, 3600) and f["hcal"].compression == "gzip" and f["hcal"].chunks
    assert _hidden(tmp_path) == []


# ================================================================ 5. writes that fail


def _small_fsize() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.parametrize("command", ["synth", "generate", "evaluate_json"])
def test_file_size_limit_mid_write_is_one_line_and_leaves_nothing(command: str, workdir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if command == "synth":
        args = ["-m", "calotune.data", "synth", "zdc", "--events", "40", "--seed", "1", "--out", "o.h5"]
    elif command == "generate":
        args = ["-m", "calotune.generate", str(workdir / "model"), "--conditions", str(workdir / "ref.h5"),
                "--out", "o.h5", "--events", "25", "--batch-size", "10"]
    else:
        big = out.parent / "ref_big.h5"
        ZDC().write(big, ZDC().synthesize(8, seed=5))
        resource_limit = 100  # the JSON report is larger than this
        args = ["-c", f"import resource,signal,sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({resource_limit}, {resource_limit})); "
                "from calotune.evaluate import main; sys.exit(main(sys.argv[1:]))",
                str(big), "--reference", str(big), "--dataset", "zdc", "--json", "o.json"]
    proc = _run(args, out, preexec=None if command == "evaluate_json" else _small_fsize)
    assert proc.returncode == 2, proc.stderr
    name = "o.json" if command == "evaluate_json" else "o.h5"
    _one_error_line(proc.stderr, name, "File too large", progress=command == "evaluate_json")
    assert list(out.iterdir()) == []  # no output, no hidden temporary


def test_write_error_in_process_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "keep.h5"
    atomic_write(target, {"a": np.zeros((2, 2), np.float32)})
    before = _sha(target)
    proc = _run(["-c", (
        "import resource,signal,numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        "from calotune.data.hdf5 import atomic_write\n"
        "from calotune.errors import UserError\n"
        "try:\n"
        f"    atomic_write({str(target)!r}, {{'a': np.random.default_rng(0).random((200, 1000))}})\n"
        "except UserError as e:\n"
        "    print('error:', e)\n")], tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "keep.h5" in proc.stdout and "File too large" in proc.stdout
    assert _sha(target) == before and _hidden(tmp_path) == []


# ================================================================ 6. killed writers

_WRITER = """
import sys, numpy as np
from calotune.data.hdf5 import StreamWriter
with StreamWriter(sys.argv[1]) as w:
    w.append({"a": np.zeros((10, 10), np.float32)})
    print("writing", flush=True)
    sys.stdin.read()  # hold the temporary open until the test kills this writer
"""


def _start_writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def test_sigkilled_writer_temporary_is_removed_by_next_write(tmp_path: Path) -> None:
    dead = _start_writer(tmp_path / "dead.h5")
    live = _start_writer(tmp_path / "live.h5")
    try:
        dead_tmp = [n for n in _hidden(tmp_path) if n.startswith(".dead.h5.")]
        live_tmp = [n for n in _hidden(tmp_path) if n.startswith(".live.h5.")]
        assert len(dead_tmp) == 1 and len(live_tmp) == 1
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        # a temporary of another host, and a legacy one that is recent: never touched
        foreign = tmp_path / ".x.h5.calotune-otherhost-1-0123abcd.tmp"
        foreign.write_bytes(b"x")
        assert (tmp_path / dead_tmp[0]).exists()
        # the next write into the folder, by a real command
        proc = _run(["-m", "calotune.data", "synth", "zdc", "--events", "3", "--seed", "1", "--out", "s.h5"],
                    tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert not (tmp_path / dead_tmp[0]).exists()
        assert (tmp_path / live_tmp[0]).exists() and foreign.exists()
    finally:
        live.kill()
        live.wait()
        dead.kill() if dead.poll() is None else None


def test_reused_pid_does_not_protect_a_stale_temporary(tmp_path: Path) -> None:
    """The pid now belongs to a process that started after the temporary was last written."""
    # a live process that stays until the test ends it (stdin closed), however slow the machine
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == "up"
        stale = hdf5.temporary_path(tmp_path / "a.h5")
        stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-"))
        stale.write_bytes(b"x")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        zombie_free = remove_stale_temporaries(tmp_path)
        assert zombie_free == [stale]
        # same name, written now: the live sleeper may be its writer, so it stays
        stale.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()
