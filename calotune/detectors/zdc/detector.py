"""The ZDC detector: geometry, synthesis, files, scores and plots behind one Detector."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.base import Detector, Summary
from calotune.detectors.zdc import evaluation, geometry, plots, synthesis
from calotune.detectors.zdc.geometry import ZDCGeometry
from calotune.detectors.zdc.io import CONDITION_KEYS, ZDCFiles
from calotune.errors import UserError
from calotune.showers import ShowerSet

__all__ = ["ZDC"]


class ZDC(ZDCFiles, Detector):
    """The ZDC: ``ZDC(**overrides)`` takes any :class:`ZDCGeometry` field by keyword."""

    name = "zdc"
    conditions = ("energy", "theta", "phi")
    parts = ("ecal", "hcal")
    shower_kind = "grid"
    #: bump when the synthetic parametrisation changes, so cached samples are rebuilt.
    synthesis_version = 1
    #: ShowerSet condition -> HDF5 key.
    condition_keys: dict[str, str] = CONDITION_KEYS

    def __init__(self, **geometry: Any) -> None:
        self.geometry = ZDCGeometry(**geometry)

    def __repr__(self) -> str:
        return f"ZDC({self.geometry})"

    @property
    def part_sizes(self) -> dict[str, int]:
        return {"ecal": self.geometry.n_ecal, "hcal": self.geometry.n_hcal}

    def geometry_dict(self) -> dict[str, Any]:
        return asdict(self.geometry)

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> ZDC:
        unknown = sorted(set(geometry) - {f.name for f in fields(ZDCGeometry)})
        if unknown:
            raise UserError(
                f"zdc geometry: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(f.name for f in fields(ZDCGeometry))}"
            )
        return cls(**geometry)

    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Parametrised showers (:func:`calotune.detectors.zdc.synthesis.synthesize`); options
        ``particle`` ("neutron" | "photon") and ``mode`` ("full" | "pencil"). Same seed, same
        showers."""
        return synthesis.synthesize(
            self.geometry, n_events, seed, name=self.name, version=self.synthesis_version, **options
        )

    def cell_centres(self) -> dict[str, np.ndarray]:
        return geometry.cell_centres(self.geometry)

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return geometry.locate(self.geometry, xyz)

    def objectives(self) -> dict[str, str]:
        return dict(evaluation.ZDC_OBJECTIVES)

    def default_objective(self) -> tuple[str, str]:
        return evaluation.default_objective()

    def summarise(self, showers: ShowerSet) -> Summary:
        """The per-event features :func:`.evaluation.zdc_features`: 8 scalars and one energy per
        HCAL layer in float64, 352 bytes an event at the full geometry against 16 kB of cells."""
        return Summary(len(showers), evaluation.zdc_features(showers, self.geometry),
                       meta={"detector": self.summary_key})

    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        return evaluation.zdc_scores_from_features(reference.events, generated.events)

    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        return plots.plot_zdc_from_features(reference.events, generated.events, self.geometry, Path(out_dir))
