"""ZDC features, scores and plots: moved to :mod:`calotune.detectors.zdc.evaluation` and
:mod:`calotune.detectors.zdc.plots`, so that every detector keeps its metrics in its own
package; this module re-exports them for existing imports."""

from calotune.detectors.zdc.evaluation import (
    EPS,
    PROFILE_FEATURE,
    SCALAR_FEATURES,
    ZDC_OBJECTIVES,
    hcal_cell_coordinates,
    zdc_features,
    zdc_scores,
)
from calotune.detectors.zdc.plots import plot_zdc

__all__ = [
    "EPS",
    "PROFILE_FEATURE",
    "SCALAR_FEATURES",
    "ZDC_OBJECTIVES",
    "hcal_cell_coordinates",
    "plot_zdc",
    "zdc_features",
    "zdc_scores",
]
