"""Synthetic showers on the regular ATLAS binning.

The showers are those of :mod:`calotune.detectors.calochallenge.synthesis` (GFlash,
hep-ex/0001020, for the electromagnetic parts; the Bock et al. hadronic profile for pions)
deposited directly on the regular grid, with the dataset-1 incident energies 2^8 .. 2^22
MeV and the 1 MeV readout threshold. Physically shaped stand-ins, not Geant4 and not ATLAS.
"""

from __future__ import annotations

from typing import Any

from calotune.detectors.calochallenge import synthesis as cc_synthesis
from calotune.detectors.calochallenge.geometry import CaloChallengeGeometry
from calotune.showers import ShowerSet

__all__ = ["synthesize"]


def synthesize(geom: CaloChallengeGeometry, n_events: int, seed: int, *, name: str,
               **options: Any) -> ShowerSet:
    """Synthetic showers (option ``energies``, MeV); same seed, same showers."""
    showers = cc_synthesis.synthesize(geom, n_events, seed, name=name, **options)
    showers.attrs["binning"] = "atlas-regular"
    return showers
