"""Fixed toy CaloChallenge samples for the agreement test against the official evaluation.

The official numbers in ``tests/test_official_agreement.py`` were computed by the
CaloChallenge ``evaluate.py`` (arXiv 2410.21611) on files written by :func:`write_pair`.
The recipe is deliberately independent of :mod:`calotune.detectors.calochallenge`'s
synthesis, so that improving the synthetic showers never changes these files (and never
silently invalidates the recorded numbers). It only has to be deterministic and give every
histogram something to count: a per-event visible fraction, a Gamma-shaped longitudinal
profile with a random shape per event, exponential radial fall-off, Gamma voxel
fluctuations and a random azimuthal asymmetry. Values are float64, as in the official files.

Write the files (used to produce the recorded numbers)::

    .venv/bin/python -m tests.official_toy /tmp/official/files
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import h5py
import numpy as np

from calotune.detectors import get_detector

__all__ = ["EVENTS", "SPECS", "toy_sample", "write_pair"]

logger = logging.getLogger(__name__)

#: dataset -> registered detector name
SPECS = {
    "1-photons": "calochallenge-1-photons",
    "1-pions": "calochallenge-1-pions",
    "2": "calochallenge-2",
    "3": "calochallenge-3",
}
#: events per file (ds3 fewer: 40,500 voxels per event)
EVENTS = {"1-photons": 3000, "1-pions": 3000, "2": 2000, "3": 600}


def toy_sample(dataset: str, n: int, seed: int, response: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(incident_energies (n, 1), showers (n, n_voxels)), float64, MeV."""
    det = get_detector(SPECS[dataset])
    geom = det.geometry
    rng = np.random.default_rng(seed)
    if geom.discrete_energies_mev:
        energy = rng.choice(np.asarray(geom.discrete_energies_mev), size=n)
    else:
        energy = np.exp(rng.uniform(np.log(1e3), np.log(1e6), n))
    n_layers = len(geom.layer_ids)
    visible = response * rng.normal(0.97 if geom.particle != "pion" else 0.8, 0.03, n)
    shape = 2.0 + rng.gamma(4.0, 0.5, n)
    depth = (np.arange(n_layers) + 0.5) / n_layers * 10.0
    profile = depth[None, :] ** (shape[:, None] - 1.0) * np.exp(-depth[None, :])
    profile /= profile.sum(axis=1, keepdims=True)
    showers = np.zeros((n, det.binning.n_voxels))
    for i, layer in enumerate(det.binning.layers):
        r_mid = layer.r_mid
        width = 0.15 * r_mid[-1] * (1.0 + 0.3 * rng.random(n))
        radial = np.exp(-r_mid[None, :] / width[:, None])
        radial /= radial.sum(axis=1, keepdims=True)
        tilt = 1.0 + 0.2 * rng.normal(size=(n, layer.n_alpha))
        tilt = np.clip(tilt, 0.1, None)
        tilt /= tilt.sum(axis=1, keepdims=True)
        mean = (energy * visible * profile[:, i])[:, None, None] \
            * tilt[:, :, None] * radial[:, None, :]
        voxels = mean * rng.gamma(1.5, 1.0 / 1.5, mean.shape)
        showers[:, det.binning.layer_slice(i)] = voxels.reshape(n, -1)
    return energy[:, None], showers


def write_pair(folder: Path, dataset: str) -> tuple[Path, Path]:
    """reference (seed 1) and generated (seed 2, response x 1.01) files for ``dataset``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, seed, response in (("reference", 1, 1.0), ("generated", 2, 1.01)):
        energy, showers = toy_sample(dataset, EVENTS[dataset], seed, response)
        path = folder / f"toy_{dataset}_{label}.hdf5"
        with h5py.File(path, "w") as f:
            f.create_dataset("incident_energies", data=energy, compression="gzip")
            f.create_dataset("showers", data=showers, compression="gzip")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    out = Path(sys.argv[1])
    for ds in SPECS:
        for p in write_pair(out, ds):
            logger.info("wrote %s", p)
