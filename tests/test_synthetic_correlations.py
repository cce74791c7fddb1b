"""Synthetic CaloChallenge showers correlate their layer energies like Geant4 does.

Geant4 matrices: "PCC Layer Energies" of the GEANT4 row in the CaloChallenge results
tables (arXiv 2410.21611), stored in ``benchmarks/geant4_layer_correlations.json``.
Issue 10 asks for a mean absolute off-diagonal difference below 0.15 per dataset.
Before the conversion depth, upstream material, albedo and pi0 sub-showers were modelled the
values were 0.197 (1-photons) and 0.196 (1-pions), so this test does fail on a regression.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calotune.detectors import get_detector
from calotune.detectors.calochallenge import layer_correlation, mean_offdiagonal_difference
from calotune.metrics.hlf import compute_hlf

GEANT4 = json.loads((Path(__file__).resolve().parent.parent / "benchmarks"
                     / "geant4_layer_correlations.json").read_text())["matrices"]


@pytest.mark.parametrize(("dataset", "name", "events"), [
    ("1-photons", "calochallenge-1-photons", 4000),
    ("1-pions", "calochallenge-1-pions", 4000),
    ("2", "calochallenge-2", 1500),
    ("3", "calochallenge-3", 300),
])
def test_layer_correlations_close_to_geant4(dataset: str, name: str, events: int) -> None:
    det = get_detector(name)
    sample = det.synthesize(events, seed=3)
    hlf = compute_hlf(sample.cells["showers"], sample.conditions["energy"], det.binning)
    synthetic = layer_correlation(hlf.e_layer)
    geant4 = np.asarray(GEANT4[dataset])
    assert synthetic.shape == geant4.shape
    assert mean_offdiagonal_difference(synthetic, geant4) < 0.15


def test_layer_correlation_handles_empty_layers() -> None:
    e = np.array([[1.0, 0.0, 2.0], [2.0, 0.0, 4.1], [3.0, 0.0, 5.9]])
    c = layer_correlation(e)
    np.testing.assert_allclose(np.diag(c), 1.0)
    assert c[0, 1] == 0.0 and c[1, 2] == 0.0  # constant layer: NaN -> 0, as the results code
    assert c[0, 2] == pytest.approx(np.corrcoef(e[:, 0], e[:, 2])[0, 1])
    assert mean_offdiagonal_difference(c, c) == 0.0
    with pytest.raises(ValueError, match="square"):
        mean_offdiagonal_difference(c, c[:2])
