"""CEPC ECAL barrel (seed 001): showers as variable-length lists of fired cells.

The CEPC group generates ECAL-barrel showers as energy-sorted cell sequences conditioned
on the particle's four-momentum, so this detector is of the "points" kind
(:mod:`calotune.pointclouds`): one hit per fired readout cell, at the cell centre, in
global (x, y, z) mm, with E in MeV; conditions ``energy`` (MeV, first), ``px``, ``py``,
``pz`` (MeV). Metrics bin hits onto the seed's cylindrical (R, Z, phi) grid (28 x 15 x 32
by default, finer by geometry override). Synthetic showers: GFlash in a homogenised Si-W
stack (Grindhammer & Peters, hep-ex/0001020).

Modules, the same set for every detector: :mod:`.geometry`, :mod:`.synthesis`, :mod:`.io`,
:mod:`.evaluation`, :mod:`.plots`, :mod:`.detector`.
"""

from calotune.detectors.cepc.detector import CEPCECal
from calotune.detectors.cepc.geometry import CEPCGeometry
from calotune.detectors.cepc.io import CONDITION_KEYS

__all__ = ["CONDITION_KEYS", "CEPCECal", "CEPCGeometry"]
