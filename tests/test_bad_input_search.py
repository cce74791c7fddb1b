"""Bad input to ``calotune.search`` that used to be found late (after Ray started, after
the MLflow run existed) or never: each is now one line, exit 2, nothing recorded."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from calotune.search import main as search_main
from tests.helpers import run_cli
from tests.test_bad_input import _assert_clean

SPACE = "zdc_swiglu_tiny"


def _run(home: Path, *extra: str) -> int:
    return search_main([SPACE, "--home", str(home), *extra])


@pytest.mark.parametrize("value", [
    "{nan", '"nan"', "[1, 2]", '{"kind": "explode"}', '{"kind": "nan", "epoch": "two"}',
    '{"kind": "nan", "epoch": 0}', '{"kind": "nan", "when": 3}', '{"kind": "raise", "above": true}',
])
def test_malformed_fault_variable_is_named(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CALOTUNE_FAULT", value)
    home = tmp_path / "home"
    _assert_clean(_run(home), capsys.readouterr().err, home, "CALOTUNE_FAULT")


@pytest.mark.parametrize("flag", ["--home", "--storage-path"])
def test_folder_flags_pointing_at_a_file(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    if flag == "--home":
        code = search_main([SPACE, "--home", str(a_file)])
    else:
        code = search_main([SPACE, "--home", str(tmp_path / "home"), "--storage-path", str(a_file)])
    err = capsys.readouterr().err
    _assert_clean(code, err, tmp_path / "home", flag, "is a file")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize(("flags", "needle"), [
    (["--events", "30"], "each split needs at least"),
    (["--events", "120"], "each split needs at least"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--cpus-per-trial", "1e-6"], "Ray's resolution"),
    (["--gpus-per-trial", "1.5"], "whole number"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be >= 0"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--trials", "0"], "--trials must be > 0"),
])
def test_bad_budget_and_resource_flags(flags: list[str], needle: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _assert_clean(_run(home, *flags), capsys.readouterr().err, home, needle)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "no-port-here"])
def test_unreachable_cluster_address_is_refused_at_once(address: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    address = address.format(port=_closed_port())
    _assert_clean(_run(home, "--address", address), capsys.readouterr().err, home, f"--address {address}")


def test_unreachable_ray_address_from_the_environment_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    home = tmp_path / "home"
    _assert_clean(_run(home), capsys.readouterr().err, home, "RAY_ADDRESS")


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "needle"), [
    (["--cpus-per-trial", "512"], "512 CPU"),
    (["--gpus-per-trial", "1", "--workers-per-trial", "2"], "2 worker(s) x (1 CPU, 1 GPU)"),
])
def test_resources_no_node_can_hold_are_refused(flags: list[str], needle: str, tmp_path: Path) -> None:
    """Tune would wait forever for them; the local Ray has a couple of CPUs and no GPU.

    A real process: the refusal comes after Ray has started, and Ray's start-up chatter
    must not turn the one-line message into a page.
    """
    import torch

    if "--gpus-per-trial" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    home = tmp_path / "home"
    proc = run_cli(["calotune.search", SPACE, "--home", str(home), *flags], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # calotune's own progress lines (data, search plan) may precede it; Ray says nothing
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    assert needle in errors[0] and "the Ray cluster has" in errors[0]
    assert "Traceback" not in proc.stderr and " WARNING " not in proc.stderr, proc.stderr
    assert not (home / "mlflow.db").exists() and not (home / "ray_results").exists()


def test_a_budget_smaller_than_the_familys_phases_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Each phase needs an epoch: a two-stage family with --max-epochs 1 fails every trial."""
    from calotune.models.base import Phase
    from calotune.models.zdc_swiglu import ZDCSwiGLU

    monkeypatch.setattr(ZDCSwiGLU, "phases", lambda self: (Phase("encoder", 1.0, scoreable=False),
                                                           Phase("prior", 1.0)))
    home = tmp_path / "home"
    _assert_clean(_run(home, "--max-epochs", "1"), capsys.readouterr().err, home,
                  "--max-epochs 1", "['encoder', 'prior']")
