"""Zero-degree calorimeter: a crystal ECAL in front of a 36-layer sampling HCAL.

Modelled on the ePIC ZDC that the Academia Sinica ZDC-ML group trains on (seed slides
000): ECAL and HCAL are separate parts because their networks run as parallel paths,
and the HCAL keeps its full (layer, x, y) segmentation because the X-Z development of
neutron showers is what those networks find hardest. Real simulation output is not
public, so :meth:`ZDC.synthesize` builds parametrised showers instead (GFlash, hep-ex/0001020):
photons follow Grindhammer & Peters (GFlash, hep-ex/0001020), neutrons the hadronic
profile of Bock et al., NIM 186 (1981) 533 (both in :mod:`calotune.detectors.gflash`).

Stored energies are in MeV. HCAL cells hold visible energy divided by the sampling
fraction (the CaloChallenge convention), so ECAL and HCAL add up to the shower energy and
the HCAL/total fraction is meaningful.

Modules, the same set for every detector: :mod:`.geometry` (cell layout, point-cloud cell
centres), :mod:`.synthesis` (parametrised showers), :mod:`.io` (HDF5 layout, see there),
:mod:`.evaluation` (features and scores), :mod:`.plots`, and :mod:`.detector` (the
:class:`ZDC` that ties them together).
"""

from calotune.detectors.zdc.detector import ZDC
from calotune.detectors.zdc.geometry import ZDCGeometry
from calotune.detectors.zdc.io import CONDITION_KEYS
from calotune.detectors.zdc.synthesis import ENERGY_RANGES_GEV

__all__ = ["CONDITION_KEYS", "ENERGY_RANGES_GEV", "ZDC", "ZDCGeometry"]
