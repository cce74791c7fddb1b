"""The ``atlas-regular`` detector: the CaloChallenge detector on the regular binning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.atlas_regular import evaluation, geometry, plots, synthesis
from calotune.detectors.atlas_regular.geometry import AtlasRegularGeometry
from calotune.detectors.atlas_regular.io import AtlasRegularFiles
from calotune.detectors.base import Summary
from calotune.detectors.calochallenge.detector import CaloChallenge
from calotune.detectors.hepstyle import hep_style
from calotune.showers import ShowerSet

__all__ = ["AtlasRegular", "atlas_regular"]

NAME = "atlas-regular"


class AtlasRegular(AtlasRegularFiles, CaloChallenge):
    """7 layers x 14 phi x 24 r (by default) on the ATLAS dataset-1 barrel layers.

    Its geometry dict is the regular binning's own (``n_r``, ``n_phi``, ``r_max_mm``,
    ``particle``), so a search space can shrink it (``geometry: {n_r: 6, n_phi: 4}``); the
    CaloChallenge geometry built from it drives scores, files and synthesis.
    """

    synthesis_version = 0

    def __init__(self, regular: AtlasRegularGeometry) -> None:
        super().__init__(regular.calochallenge(NAME))
        self.regular = regular

    def __repr__(self) -> str:
        r = self.regular
        return f"AtlasRegular({r.particle}, 7 x {r.n_phi} x {r.n_r} = {r.n_voxels} voxels)"

    def geometry_dict(self) -> dict[str, Any]:
        return self.regular.to_dict()

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> AtlasRegular:
        return cls(AtlasRegularGeometry.from_dict(dict(geometry)))

    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Synthetic showers (:mod:`.synthesis`); option ``energies`` (MeV)."""
        return synthesis.synthesize(self.geometry, n_events, seed, name=self.name, **options)

    def cell_centres(self) -> dict[str, np.ndarray]:
        return geometry.cell_centres(self.geometry)

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return geometry.locate(self.geometry, xyz)

    def default_objective(self) -> tuple[str, str]:
        return evaluation.default_objective()

    # summarise, scores_from and plot_from: CaloChallenge's (the CaloChallenge search scores,
    # fast classifier, sample-size-adapted FPD/KPD, on this binning), through the same
    # evaluation and plots modules this package re-exports.
    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        """The CaloChallenge search scores (fast classifier, sample-size-adapted FPD/KPD)."""
        result = evaluation.compare_summaries(self.binning, reference, generated, classifier="fast",
                                              official_distances=False)
        return result.objectives()

    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        with hep_style():  # mplhep's ROOT style, as every detector's plots
            return plots.plot_summaries(self.binning, reference, generated, Path(out_dir))


def atlas_regular(**overrides: Any) -> AtlasRegular:
    """The regular binning, optionally with geometry overrides (n_r, n_phi, r_max_mm,
    particle); an unknown name raises TypeError, which the registry reports by name."""
    known = {"n_r", "n_phi", "r_max_mm", "particle"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown geometry keys {unknown}; known: {sorted(known)}")
    return AtlasRegular(AtlasRegularGeometry(**overrides))
