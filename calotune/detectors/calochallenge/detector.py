"""The CaloChallenge detector and the four dataset presets behind one Detector each."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.base import Detector, Summary
from calotune.detectors.calochallenge import evaluation, geometry, plots, synthesis
from calotune.detectors.calochallenge.geometry import (
    _DS1_PHOTONS,
    _DS1_PIONS,
    _DS2,
    _DS3,
    CaloChallengeGeometry,
)
from calotune.detectors.calochallenge.io import CaloChallengeFiles
from calotune.detectors.hepstyle import hep_style
from calotune.metrics.hlf import Binning
from calotune.showers import ShowerSet

__all__ = ["CaloChallenge", "dataset_1_photons", "dataset_1_pions", "dataset_2", "dataset_3"]


class CaloChallenge(CaloChallengeFiles, Detector):
    """A CaloChallenge 2022 dataset: geometry, synthetic showers, file I/O and scores."""

    conditions = ("energy",)
    parts = ("showers",)
    shower_kind = "grid"
    #: bump when the synthetic parametrisation changes, so cached samples are rebuilt.
    synthesis_version = 0

    def __init__(self, geometry: CaloChallengeGeometry) -> None:
        self.geometry = geometry
        self.name = geometry.name

    def __repr__(self) -> str:
        return f"CaloChallenge({self.name!r}, {self.geometry.n_voxels} voxels)"

    @property
    def binning(self) -> Binning:
        return self.geometry.binning

    @property
    def part_sizes(self) -> dict[str, int]:
        return {"showers": self.geometry.n_voxels}

    def geometry_dict(self) -> dict[str, Any]:
        return self.geometry.to_dict()

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> CaloChallenge:
        return cls(CaloChallengeGeometry.from_dict(geometry))

    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Synthetic reference showers (:mod:`calotune.detectors.calochallenge.synthesis`);
        option ``energies`` (MeV). Same seed, same showers."""
        return synthesis.synthesize(self.geometry, n_events, seed, name=self.name, **options)

    def cell_centres(self) -> dict[str, np.ndarray]:
        return geometry.cell_centres(self.geometry)

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return geometry.locate(self.geometry, xyz)

    def objectives(self) -> dict[str, str]:
        """Scores for searches, all minimised.

        sep_*: mean separation power of a feature group over layers (sep_mean: over every
        histogram); fpd / kpd: x 10^3 as published; auc_* / jsd_*: fast classifier on
        low-level (voxels) and high-level inputs. AUC is minimised towards 0.5: after
        isotonic calibration it does not go meaningfully below 0.5.
        """
        return dict.fromkeys(evaluation.OBJECTIVES, "min")

    def default_objective(self) -> tuple[str, str]:
        return evaluation.default_objective()

    def summarise(self, showers: ShowerSet) -> Summary:
        """HLF and the voxel spectrum's values per event, plus the low-level classifier's
        inputs ([log10 E_inc, voxels / E_inc], float32, marked heavy): the fast classifier
        trains on every event's voxels, so this one score keeps a cell-sized array per
        sample (:mod:`.evaluation`); :meth:`Summary.for_plots` drops it."""
        return evaluation.summarise(self.binning, showers, meta={"detector": self.summary_key})

    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        """All :meth:`objectives` with the fast classifier (seconds, not minutes, per
        call). Sample sizes are whatever the caller passes; FPD/KPD adapt their bootstrap
        sizes to them (``adaptive`` in :func:`calotune.metrics.fpd_kpd.fpd`), which keeps a
        search fast but is not the published setting: ``calotune.evaluate`` uses that."""
        result = evaluation.compare_summaries(self.binning, reference, generated, classifier="fast",
                                              official_distances=False)
        return result.objectives()

    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        with hep_style():  # mplhep's ROOT style, as every detector's plots
            return plots.plot_summaries(self.binning, reference, generated, Path(out_dir))


def _build(base: CaloChallengeGeometry, overrides: dict[str, Any]) -> CaloChallenge:
    """A detector from a preset; unknown override names raise TypeError (the registry
    turns that into a UserError naming the detector)."""
    return CaloChallenge(dataclasses.replace(base, **overrides) if overrides else base)


def dataset_1_photons(**overrides: Any) -> CaloChallenge:
    """CaloChallenge dataset 1, photons (368 voxels)."""
    return _build(_DS1_PHOTONS, overrides)


def dataset_1_pions(**overrides: Any) -> CaloChallenge:
    """CaloChallenge dataset 1, charged pions (533 voxels)."""
    return _build(_DS1_PIONS, overrides)


def dataset_2(**overrides: Any) -> CaloChallenge:
    """CaloChallenge dataset 2, electrons (45 x 16 x 9 = 6480 voxels)."""
    return _build(_DS2, overrides)


def dataset_3(**overrides: Any) -> CaloChallenge:
    """CaloChallenge dataset 3, electrons (45 x 50 x 18 = 40500 voxels)."""
    return _build(_DS3, overrides)
