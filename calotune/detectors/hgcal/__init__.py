"""An HGCal-like silicon sampling calorimeter whose showers are point clouds.

Modelled on the electromagnetic endcap of the CMS High Granularity Calorimeter (TDR
CERN-LHCC-2017-023), the detector of seed 004 (the thesis "Fast HGCal Detector Simulation
via Score-Based Diffusion Models"): silicon layers behind absorber plates, square cells
(documented in :mod:`.geometry`), and showers stored as hits (x, y, z, E), one per cell
above threshold, so the number of hits grows with energy. Real simulation output is not
public, so :meth:`HGCal.synthesize` builds GFlash electron showers (hep-ex/0001020;
GFlash, hep-ex/0001020).

Modules, the same set for every detector: :mod:`.geometry` (cells, point-cloud binning),
:mod:`.synthesis` (parametrised showers), :mod:`.io` (HDF5 layout), :mod:`.evaluation`
(features and scores, among them hits per event and the energy-weighted radius against
incident energy), :mod:`.plots`, and :mod:`.detector` (the :class:`HGCal`).
"""

from calotune.detectors.hgcal.detector import HGCal
from calotune.detectors.hgcal.geometry import HGCalGeometry
from calotune.detectors.hgcal.io import CONDITION_KEYS
from calotune.detectors.hgcal.synthesis import ENERGY_RANGE_GEV

__all__ = ["CONDITION_KEYS", "ENERGY_RANGE_GEV", "HGCal", "HGCalGeometry"]
