"""Scores of the regular binning: the CaloChallenge 2022 numbers (separation powers, FPD /
KPD of arXiv 2211.10295 on the high-level features, the classifier test; arXiv 2410.21611)
on this binning, whose seven layers all have angular bins, so centres and widths in eta
and phi exist in every layer."""

from __future__ import annotations

from calotune.detectors.calochallenge.evaluation import (
    OBJECTIVES,
    Comparison,
    compare,
    compare_summaries,
    default_objective,
    summarise,
)

__all__ = ["OBJECTIVES", "Comparison", "compare", "compare_summaries", "default_objective", "summarise"]
