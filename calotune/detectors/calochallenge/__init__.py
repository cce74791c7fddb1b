"""CaloChallenge 2022 detectors: datasets 1-photons, 1-pions, 2 and 3.

Geometry, file layout and scores follow the Fast Calorimeter Simulation Challenge 2022
(community paper arXiv 2410.21611). Modules, the same set for
every detector: :mod:`.geometry` (voxel layout, point-cloud cell centres), :mod:`.synthesis`
(GFlash showers, hep-ex/0001020), :mod:`.io` (HDF5 layout), :mod:`.evaluation`
(separation power, FPD/KPD, classifier), :mod:`.plots`, and :mod:`.detector` (the
:class:`CaloChallenge` class and the dataset factories). Every name importable from this
module before the split still is.
"""

from calotune.detectors.calochallenge.detector import (
    CaloChallenge,
    dataset_1_photons,
    dataset_1_pions,
    dataset_2,
    dataset_3,
)
from calotune.detectors.calochallenge.evaluation import (
    Comparison,
    compare,
    layer_correlation,
    mean_offdiagonal_difference,
)
from calotune.detectors.calochallenge.geometry import DATASET_WIDTHS, CaloChallengeGeometry
from calotune.detectors.calochallenge.plots import plot_comparison, plot_layer_correlations

__all__ = [
    "DATASET_WIDTHS",
    "CaloChallenge",
    "CaloChallengeGeometry",
    "Comparison",
    "compare",
    "dataset_1_photons",
    "dataset_1_pions",
    "dataset_2",
    "dataset_3",
    "layer_correlation",
    "mean_offdiagonal_difference",
    "plot_comparison",
    "plot_layer_correlations",
]
