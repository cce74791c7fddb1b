"""Reference-vs-generated plots of the regular binning (the CaloChallenge plots)."""

from __future__ import annotations

from calotune.detectors.calochallenge.plots import plot_detector, plot_summaries

__all__ = ["plot_detector", "plot_summaries"]
