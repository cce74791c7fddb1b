"""The CEPC ECAL barrel: geometry, synthesis, files, scores and plots behind one Detector."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from calotune.detectors.base import Detector, Summary
from calotune.detectors.cepc import evaluation, plots, synthesis
from calotune.detectors.cepc.geometry import CEPCGeometry
from calotune.detectors.cepc.io import CONDITION_KEYS, CEPCFiles
from calotune.detectors.hepstyle import hep_style
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet

__all__ = ["CEPCECal"]


class CEPCECal(CEPCFiles, Detector):
    """The CEPC ECAL barrel as fired-cell point clouds: ``CEPCECal(**overrides)`` takes any
    :class:`CEPCGeometry` field by keyword."""

    name = "cepc-ecal"
    conditions = ("energy", "px", "py", "pz")
    parts = ("hits",)
    shower_kind = "points"
    #: bump when the synthetic parametrisation changes, so cached samples are rebuilt.
    synthesis_version = 1
    condition_keys: dict[str, str] = CONDITION_KEYS

    def __init__(self, **geometry: Any) -> None:
        self.geometry = CEPCGeometry(**geometry)

    def __repr__(self) -> str:
        return f"CEPCECal({self.geometry})"

    @property
    def part_sizes(self) -> dict[str, int]:
        return {"hits": 4 * self.geometry.max_hits}

    def geometry_dict(self) -> dict[str, Any]:
        return asdict(self.geometry)

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> CEPCECal:
        known = [f.name for f in fields(CEPCGeometry)]
        unknown = sorted(set(geometry) - set(known))
        if unknown:
            raise UserError(f"cepc-ecal geometry: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**geometry)

    def synthesize(self, n_events: int, seed: int, **options: Any) -> PointCloudSet:
        """GFlash photon/electron showers (:mod:`calotune.detectors.cepc.synthesis`)."""
        return synthesis.synthesize(self.geometry, n_events, seed, name=self.name,
                                    version=self.synthesis_version, **options)

    def objectives(self) -> dict[str, str]:
        return dict(evaluation.OBJECTIVES)

    def default_objective(self) -> tuple[str, str]:
        return evaluation.default_objective()

    def summarise(self, showers: PointCloudSet) -> Summary:  # type: ignore[override]
        """Per-event features, a 16-byte key per event for the duplicate fraction and the
        pooled hit energies (:func:`.evaluation.summarise`): 4 bytes a hit plus about
        400 bytes an event, against 16 bytes a hit for the sample."""
        return evaluation.summarise(showers, self.geometry, {"detector": self.summary_key})

    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        return evaluation.scores_from_summaries(reference, generated)

    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        with hep_style():  # mplhep's ROOT style, as every detector's plots
            return plots.plot_cepc_from_features(reference.events, generated.events, self.geometry, Path(out_dir))
