"""Layer-energy correlations of calotune's synthetic showers against Geant4's.

The Geant4 matrices (``geant4_layer_correlations.json``) are the "PCC Layer Energies" of
the GEANT4 row of the CaloChallenge results tables (``final_results/*.hdf`` of
github.com/CaloChallenge/homepage; community paper arXiv 2410.21611). For each dataset
this writes ``correlations_<dataset>.png`` (synthetic, Geant4, difference) and prints
the mean absolute off-diagonal difference and the mean sparsity per layer::

    .venv/bin/python benchmarks/synthetic_correlations.py --out benchmarks/figures

Issue 10 asks for a mean difference below 0.15 for every dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from calotune.detectors import get_detector
from calotune.detectors.calochallenge import (
    layer_correlation,
    mean_offdiagonal_difference,
    plot_layer_correlations,
)
from calotune.metrics.hlf import compute_hlf

logger = logging.getLogger("synthetic_correlations")

HERE = Path(__file__).resolve().parent
DETECTORS = {"1-photons": "calochallenge-1-photons", "1-pions": "calochallenge-1-pions",
             "2": "calochallenge-2", "3": "calochallenge-3"}
EVENTS = {"1-photons": 10_000, "1-pions": 10_000, "2": 5_000, "3": 1_000}


def geant4_correlations() -> dict[str, np.ndarray]:
    """dataset -> Geant4 layer-energy correlation matrix (layer order)."""
    data = json.loads((HERE / "geant4_layer_correlations.json").read_text())
    return {k: np.asarray(v, dtype=np.float64) for k, v in data["matrices"].items()}


def run(dataset: str, n_events: int, seed: int, out: Path | None) -> dict[str, object]:
    det = get_detector(DETECTORS[dataset])
    sample = det.synthesize(n_events, seed=seed)
    hlf = compute_hlf(sample.cells["showers"], sample.conditions["energy"], det.binning)
    synthetic = layer_correlation(hlf.e_layer)
    geant4 = geant4_correlations()[dataset]
    result: dict[str, object] = {
        "dataset": dataset,
        "events": n_events,
        "mean_abs_offdiagonal_difference": mean_offdiagonal_difference(synthetic, geant4),
        "mean_sparsity_per_layer": [round(float(v), 3) for v in hlf.sparsity.mean(axis=0)],
    }
    if out is not None:
        path = plot_layer_correlations(synthetic, geant4, list(hlf.layer_ids),
                                       f"dataset {dataset}, {n_events} synthetic events",
                                       out / f"correlations_{dataset}.png")
        result["figure"] = str(path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--datasets", nargs="*", default=list(DETECTORS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for dataset in args.datasets:
        res = run(dataset, EVENTS[dataset], args.seed, args.out)
        logger.info("dataset %s (%d events): mean |C_synthetic - C_Geant4| off-diagonal = "
                    "%.3f; mean sparsity per layer %s", dataset, res["events"],
                    res["mean_abs_offdiagonal_difference"], res["mean_sparsity_per_layer"])


if __name__ == "__main__":
    main()
