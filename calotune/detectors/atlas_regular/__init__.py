"""ATLAS-like regular binning (CaloQVAE, seed 003): z = 7 layers, r = 24, phi = 14.

The seven ATLAS barrel layers of CaloChallenge dataset 1 (arXiv 2410.21611), each on the
same regular (phi x r) grid, with synthetic showers. It is a CaloChallenge detector on a
different binning, so it composes the CaloChallenge package rather than copying it.
Modules, the same set for every detector: :mod:`.geometry`, :mod:`.synthesis`, :mod:`.io`,
:mod:`.evaluation`, :mod:`.plots`, and :mod:`.detector` (:class:`AtlasRegular`).
"""

from calotune.detectors.atlas_regular.detector import AtlasRegular, atlas_regular
from calotune.detectors.atlas_regular.geometry import LAYER_IDS, N_LAYERS, AtlasRegularGeometry

__all__ = ["LAYER_IDS", "N_LAYERS", "AtlasRegular", "AtlasRegularGeometry", "atlas_regular"]
