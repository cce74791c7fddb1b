"""Bad input: one clear line naming file/key/flag, exit status 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from calotune.generate import main as generate_main
from calotune.promote import main as promote_main
from calotune.search import main as search_main
from calotune.spec import SPACES_DIR
from tests.helpers import run_cli

TINY = yaml.safe_load((SPACES_DIR / "zdc_swiglu_tiny.yaml").read_text())


def _space(tmp: Path, change) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    change(raw)
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _h5(tmp: Path, **overrides) -> Path:
    """A tiny zdc_swiglu_tiny-shaped file with one thing broken."""
    n = 20
    rng = np.random.default_rng(0)
    data = {
        "incident_energies": rng.uniform(1e3, 1e5, (n, 1)),
        "incident_theta": np.zeros((n, 1)), "incident_phi": np.zeros((n, 1)),
        "ecal": rng.uniform(0, 10, (n, 16)), "hcal": rng.uniform(0, 10, (n, 96)),
    }
    data.update(overrides)
    path = tmp / "data.h5"
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if value is not None:
                f.create_dataset(key, data=value)
    return path


SPACE_CASES = {
    "unknown key": (lambda r: r.update(epochs=3), "epochs"),
    "wrong type": (lambda r: r["params"]["lr_generator"].update(low="tiny"), "params.lr_generator.low"),
    "low > high": (lambda r: r["params"]["mask_loss_weight"].update(low=3.0), "`low <= high` must hold"),
    "log low <= 0": (lambda r: r["params"]["lr_generator"].update(low=0), "low > 0"),
    "unknown parent": (lambda r: r["params"]["mask_loss_weight"].update(when={"use_moe": True}),
                       "unknown parent parameter 'use_moe'"),
    "unknown family": (lambda r: r.update(family="gan9000"), "unknown model family 'gan9000'"),
    "unknown detector": (lambda r: r.update(detector="lhcb"), "unknown detector 'lhcb'"),
    "unknown objective": (lambda r: r.update(objective="fid"), "unknown objective 'fid'"),
}

DATA_CASES = {
    "missing key": ({"hcal": None}, "hcal"),
    "wrong shape": ({"hcal": np.ones((20, 95))}, "hcal"),
    "wrong dtype": ({"ecal": np.ones((20, 16), dtype=np.int32)}, "ecal"),
    "nan": ({"hcal": np.full((20, 96), np.nan)}, "hcal"),
    "negative energy": ({"incident_energies": -np.ones((20, 1))}, "incident_energies"),
}


def _assert_clean(code: int, err: str, home: Path, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    assert not (home / "mlflow.db").exists() and not (home / "ray_results").exists(), \
        "bad input must leave no MLflow store or results folder behind"


@pytest.mark.parametrize("case", sorted(SPACE_CASES))
def test_bad_search_space(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    change, needle = SPACE_CASES[case]
    path = _space(tmp_path, change)
    home = tmp_path / "home"
    code = search_main([str(path), "--home", str(home)])
    _assert_clean(code, capsys.readouterr().err, home, str(path), needle)


def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("family: zdc_swiglu\nparams: {lr: [1, 2\n")
    home = tmp_path / "home"
    _assert_clean(search_main([str(path), "--home", str(home)]), capsys.readouterr().err, home,
                  "malformed YAML at line")


def test_unknown_space_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _assert_clean(search_main(["zdc_swigl", "--home", str(home)]), capsys.readouterr().err, home,
                  "unknown search space 'zdc_swigl'", "zdc_swiglu")


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _assert_clean(search_main(["zdc_swiglu_tiny", "--data", str(tmp_path / "nope.h5"), "--home", str(home)]),
                  capsys.readouterr().err, home, "--data", "nope.h5", "does not exist")


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_hdf5(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides, key = DATA_CASES[case]
    path = _h5(tmp_path, **overrides)
    home = tmp_path / "home"
    code = search_main(["zdc_swiglu_tiny", "--data", str(path), "--home", str(home)])
    _assert_clean(code, capsys.readouterr().err, home, str(path), key)


def test_valid_hdf5_fixture_is_accepted() -> None:
    """Guard for the cases above: the unbroken fixture file must pass validation."""
    import tempfile

    from calotune.detectors import get_detector

    with tempfile.TemporaryDirectory() as tmp:
        showers = get_detector("zdc", **TINY["geometry"]).read(_h5(Path(tmp)))
    assert len(showers) == 20


def test_unreachable_tracking_uri(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    code = search_main(["zdc_swiglu_tiny", "--home", str(home), "--tracking-uri", "http://127.0.0.1:9"])
    _assert_clean(code, capsys.readouterr().err, home, "--tracking-uri http://127.0.0.1:9", "unreachable")
    assert not (home / "data").exists()


def test_unknown_registered_model_or_alias(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    _assert_clean(promote_main(["zdc", "--home", str(home)]), capsys.readouterr().err, home,
                  "no MLflow store")
    home.mkdir()
    from calotune.tracking.mlflow_tracker import Tracker

    Tracker(f"sqlite:///{home / 'mlflow.db'}", "x")  # an empty store
    code = generate_main(["models:/zdc@production", "--out", str(tmp_path / "g.h5"), "--home", str(home)])
    err = capsys.readouterr().err
    assert code == 2 and "no registered model 'zdc'" in err and not (tmp_path / "g.h5").exists()
    code = generate_main(["models:/zdc@@x", "--out", str(tmp_path / "g.h5"), "--home", str(home)])
    assert code == 2 and "models:/NAME@ALIAS" in capsys.readouterr().err


def test_cli_exit_2_without_traceback_in_a_real_process(tmp_path: Path) -> None:
    proc = run_cli(["calotune.search", "no_such_space", "--home", str(tmp_path / "home")], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown search space") and "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()
