"""The HGCal-like detector: geometry, synthesis, files, scores and plots behind one Detector."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.base import Detector, Summary
from calotune.detectors.hepstyle import hep_style
from calotune.detectors.hgcal import evaluation, geometry, plots, synthesis
from calotune.detectors.hgcal.geometry import HGCalGeometry
from calotune.detectors.hgcal.io import CONDITION_KEYS, HGCalFiles
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet, grid_to_point_cloud, grid_voxelise
from calotune.showers import ShowerSet

__all__ = ["HGCal"]


class HGCal(HGCalFiles, Detector):
    """``HGCal(**overrides)`` takes any :class:`HGCalGeometry` field by keyword.

    A "points" detector: samples are :class:`~calotune.pointclouds.PointCloudSet`, one
    hit per cell above threshold. Its own grid (:meth:`cell_centres`, :meth:`locate`,
    part ``"cells"``) is what :meth:`voxelise` and the scores put hits on.
    """

    name = "hgcal"
    conditions = ("energy",)
    parts = ("hits",)
    shower_kind = "points"
    #: bump when the synthetic parametrisation changes, so cached samples are rebuilt.
    synthesis_version = 1
    condition_keys: dict[str, str] = CONDITION_KEYS
    #: The one part of the detector's own cell grid (voxelise / to_point_cloud).
    grid_part = "cells"

    def __init__(self, **overrides: Any) -> None:
        self.geometry = HGCalGeometry(**overrides)

    def __repr__(self) -> str:
        return f"HGCal({self.geometry})"

    @property
    def part_sizes(self) -> dict[str, int]:
        """``{"hits": 4 * n_cells}``: a readout has at most one hit per cell."""
        return {"hits": 4 * self.geometry.n_cells}

    def geometry_dict(self) -> dict[str, Any]:
        return asdict(self.geometry)

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> HGCal:
        known = {f.name for f in fields(HGCalGeometry)}
        unknown = sorted(set(geometry) - known)
        if unknown:
            raise UserError(f"hgcal geometry: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**geometry)

    def synthesize(self, n_events: int, seed: int, **options: Any) -> PointCloudSet:
        """GFlash electron showers as hits (:func:`.synthesis.synthesize`); options
        ``e_min_gev`` and ``e_max_gev``. Same seed, same showers."""
        return synthesis.synthesize(self.geometry, n_events, seed, name=self.name,
                                    version=self.synthesis_version, **options)

    # ---- the detector's own grid ----------------------------------------------------
    def cell_centres(self) -> dict[str, np.ndarray]:
        return {self.grid_part: geometry.cell_centres(self.geometry)}

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return geometry.locate(self.geometry, xyz)

    def voxelise(self, cloud: PointCloudSet) -> ShowerSet:
        """Hits summed into the cells (part ``"cells"``, (N, n_cells)); no threshold, so
        ``voxelise(to_point_cloud(s))`` is exact. The scores threshold on top of it."""
        return grid_voxelise(cloud, {self.grid_part: self.geometry.n_cells}, self.locate)

    def to_point_cloud(self, showers: ShowerSet) -> PointCloudSet:
        """One hit per non-zero cell of a ``"cells"`` grid, at the cell centre."""
        return grid_to_point_cloud(showers, self.cell_centres())

    # ---- scores ---------------------------------------------------------------------
    def objectives(self) -> dict[str, str]:
        return dict(evaluation.HGCAL_OBJECTIVES)

    def default_objective(self) -> tuple[str, str]:
        return evaluation.default_objective()

    def summarise(self, showers: PointCloudSet) -> Summary:  # type: ignore[override]
        """The digitised sample's per-event features and its pooled hit energies
        (:func:`.evaluation.features`): 4 bytes per digitised hit plus about 180 per event."""
        return evaluation.to_summary(evaluation.features(showers, self.geometry), {"detector": self.summary_key})

    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        return evaluation.scores_from_features(evaluation.from_summary(reference), evaluation.from_summary(generated))

    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        with hep_style():  # mplhep's ROOT style, as every detector's plots
            ref, gen = evaluation.from_summary(reference), evaluation.from_summary(generated)
            return plots.plot_hgcal_from_features(ref, gen, self.geometry, Path(out_dir))
