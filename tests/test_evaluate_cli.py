"""``python -m calotune.evaluate`` end to end on small synthetic dataset-2 files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from calotune.detectors.calochallenge import dataset_2
from calotune.evaluate import main


@pytest.fixture(scope="module")
def ds2_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ds2")
    det = dataset_2()
    files = {}
    for name, seed in (("reference", 1), ("generated", 2)):
        files[name] = folder / f"{name}.h5"
        det.write(files[name], det.synthesize(400, seed=seed))
    return files


def test_end_to_end_json_and_plots(ds2_files: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "report" / "eval.json"
    plots = tmp_path / "plots"
    code = main([
        str(ds2_files["generated"]), "--reference", str(ds2_files["reference"]),
        "--dataset", "2", "--json", str(out_json), "--plots", str(plots),
        "--classifier", "fast", "--fpd-draws", "2",
    ])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["detector"] == "calochallenge-2"
    assert report["sizes"] == {"reference": 400, "generated": 400, "reference_half_a": 200,
                               "reference_half_b": 200}
    # separation power per feature, per layer, with the floor next to it
    sep = report["separation_power"]
    assert set(sep) >= {"etot_einc", "e_layer", "ec_eta", "ec_phi", "ec_r", "width_eta",
                        "width_phi", "width_r", "sparsity", "voxel_energy"}
    assert len(sep["e_layer"]["generated"]) == 45 == len(sep["e_layer"]["reference_floor"])
    assert sep["e_layer"]["layer_ids"] == list(range(45))
    assert all(0.0 <= v <= 1.0 for v in sep["ec_eta"]["generated"])
    means = report["separation_power_means"]
    assert set(means) >= {"etot_einc", "e_layer", "center", "width", "sparsity", "mean"}
    # FPD / KPD with errors and sizes, x 10^3 alongside raw
    for name in ("fpd", "kpd"):
        for side in ("generated", "reference_floor"):
            entry = report[name][side]
            assert {"value", "error", "value_x1e3", "error_x1e3", "n_reference",
                    "n_generated", "sample_sizes", "n_batches"} <= set(entry)
            assert entry["value_x1e3"] == pytest.approx(1e3 * entry["value"])
    assert report["fpd"]["generated"]["n_generated"] == 400
    assert report["fpd"]["reference_floor"]["n_generated"] == 200
    assert report["fpd"]["generated"]["n_batches"] == 2
    # classifier on both input kinds
    cls = report["classifier"]
    assert cls["setting"] == "fast"
    for kind in ("low_level", "high_level"):
        for side in ("generated", "reference_floor"):
            res = cls[kind][side]
            assert 0.0 <= res["auc"] <= 1.0
            assert res["jsd"] <= 1.0
            assert res["n_val"] > 0
    # same generator -> no strong separation anywhere
    assert cls["high_level"]["generated"]["auc"] < 0.7
    assert report["scores"]["sep_etot_einc"]["generated"] < 0.1
    # plots exist and are PNGs
    assert {Path(p).name for p in report["plots"]} >= {"etot_einc.png", "e_layer.png",
                                                      "ec_eta.png", "width_eta.png"}
    for p in report["plots"]:
        assert Path(p).read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "ref vs ref" in table and "FPD x1e3" in table and "AUC low-level" in table
    # sample sizes next to every number, and why small-N floors exceed the paper's
    for line in table.splitlines():
        if line.startswith(("separation", "FPD", "KPD", "AUC")):
            assert "N=" in line, line
    assert "many times the CaloChallenge paper's Geant4 values" in table
    assert "FPD x1e3 = 10.8" in table  # the paper's ds2 Geant4-vs-Geant4 value
    assert sep["e_layer"]["n_reference"] == 400 and sep["e_layer"]["floor_n"] == [200, 200]
    # official bootstrap settings (FPD 10k-50k, KPD batch 10k) in the final report
    assert report["fpd"]["generated"]["sample_sizes"][0] == 10_000
    assert report["kpd"]["generated"]["sample_sizes"] == [10_000]


def test_wrong_width_exits_2_with_one_line(ds2_files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "narrow.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("incident_energies", data=np.ones((4, 1)))
        f.create_dataset("showers", data=np.zeros((4, 6000)))
    code = main([str(bad), "--reference", str(ds2_files["reference"]), "--dataset", "2",
                 "--classifier", "none"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert "narrow.h5" in err[-1] and "6000" in err[-1] and "6480" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["missing.h5", "--dataset", "2"], "missing.h5"),
        (["GEN", "--dataset", "4"], "--dataset '4' is unknown"),
        (["GEN", "--dataset", "2", "--max-events", "2"], "--max-events"),
        (["GEN", "--dataset", "2", "--device", "nonsense"], "--device"),
    ],
)
def test_bad_input_exits_2(ds2_files: dict[str, Path], args: list[str], pattern: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("GEN", str(ds2_files["generated"])) for a in args]
    code = main([*argv, "--reference", str(ds2_files["reference"])])
    assert code == 2
    err = capsys.readouterr().err
    assert pattern in err and "Traceback" not in err


def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "calotune.evaluate", str(tmp_path / "nope.h5"),
         "--reference", str(tmp_path / "nope.h5"), "--dataset", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "nope.h5" in proc.stderr and "Traceback" not in proc.stderr
