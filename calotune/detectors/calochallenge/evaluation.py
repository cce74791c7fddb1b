"""CaloChallenge scores: separation powers, FPD / KPD and the classifier test, with the
official arithmetic (arXiv 2410.21611; separation power arXiv 2009.03796 eq. 15; FPD/KPD
arXiv 2211.10295), and the layer-correlation comparison against Geant4."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calotune.metrics.classifier import (
    ClassifierConfig,
    ClassifierResult,
    classifier_test,
    get_config,
    high_level_inputs,
    low_level_inputs,
)
from calotune.metrics.fpd_kpd import DistanceResult, fpd, kpd
from calotune.metrics.hlf import (
    Binning,
    HighLevelFeatures,
    challenge_bins,
    compute_hlf,
    group_means,
    separation_powers,
    voxel_spectrum_values,
)
from calotune.showers import ShowerSet

__all__ = [
    "OBJECTIVES",
    "Comparison",
    "compare",
    "default_objective",
    "layer_correlation",
    "mean_offdiagonal_difference",
]

#: Scores for searches, all minimised (see :meth:`CaloChallenge.objectives`).
OBJECTIVES: tuple[str, ...] = (
    "sep_etot_einc", "sep_e_layer", "sep_center", "sep_width", "sep_sparsity",
    "sep_voxel_energy", "sep_mean", "fpd", "kpd", "auc_low", "jsd_low", "auc_high", "jsd_high",
)


def default_objective() -> tuple[str, str]:
    """The mean separation power over every histogram, minimised: the one number that covers
    every feature group, is cheap at search sample sizes and, unlike FPD with an adaptive
    bootstrap or the classifier AUC, carries little noise between epochs."""
    return "sep_mean", "min"


@dataclass
class Comparison:
    """Every CaloChallenge number for one (reference, generated) pair.

    separation: feature -> per-layer <S^2> list (see
    :func:`calotune.metrics.hlf.separation_powers`); separation_means: group means.
    classifier: input kind ("low", "high") -> result.
    """

    separation: dict[str, list[float]]
    separation_means: dict[str, float]
    fpd: DistanceResult | None
    kpd: DistanceResult | None
    classifier: dict[str, ClassifierResult]
    n_reference: int
    n_generated: int

    def objectives(self) -> dict[str, float]:
        """Flat scores, keys of :meth:`CaloChallenge.objectives`; FPD/KPD x 10^3."""
        out = {f"sep_{k}": v for k, v in self.separation_means.items()}
        nan = float("nan")
        out["fpd"] = self.fpd.value_x1e3 if self.fpd else nan
        out["kpd"] = self.kpd.value_x1e3 if self.kpd else nan
        for kind in ("low", "high"):
            res = self.classifier.get(kind)
            out[f"auc_{kind}"] = res.auc if res else nan
            out[f"jsd_{kind}"] = res.jsd if res else nan
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "separation_power": self.separation,
            "separation_power_means": self.separation_means,
            "fpd": self.fpd.as_dict() if self.fpd else None,
            "kpd": self.kpd.as_dict() if self.kpd else None,
            "classifier": {k: v.as_dict() for k, v in self.classifier.items()},
            "n_reference": self.n_reference,
            "n_generated": self.n_generated,
        }


def compare(
    binning: Binning,
    reference: ShowerSet,
    generated: ShowerSet,
    *,
    reference_hlf: HighLevelFeatures | None = None,
    generated_hlf: HighLevelFeatures | None = None,
    bins: dict[str, list[np.ndarray]] | None = None,
    classifier: str | ClassifierConfig | None = "fast",
    classifier_inputs: Sequence[str] = ("low", "high"),
    distances: bool = True,
    fpd_draws: int = 20,
    seed: int = 0,
    device: str = "cpu",
    official_distances: bool = True,
) -> Comparison:
    """All CaloChallenge metrics of ``generated`` against ``reference``.

    ``bins`` (from :func:`calotune.metrics.hlf.challenge_bins`) should be fixed from the
    full reference when several pairs are compared (generated vs reference and the
    reference-half floor), so that all numbers use identical histograms. Precomputed HLF
    can be passed to avoid recomputation. ``classifier=None`` skips the classifier test;
    ``distances=False`` skips FPD/KPD; ``fpd_draws`` is the number of bootstrap draws per
    FPD sample size (20 by definition; fewer only for quick checks, it is reported);
    ``official_distances`` uses the CaloChallenge bootstrap settings (FPD 10k-50k, KPD
    batch 10k; :mod:`calotune.metrics.fpd_kpd`), False adapts them to the sample size
    for quick search scores;
    ``device`` is where the classifier trains ("cuda" for the challenge setting on ds2/3).
    """
    ref_x = reference.cells["showers"]
    gen_x = generated.cells["showers"]
    ref_e, gen_e = reference.conditions["energy"], generated.conditions["energy"]
    ref_hlf = compute_hlf(ref_x, ref_e, binning) if reference_hlf is None else reference_hlf
    gen_hlf = compute_hlf(gen_x, gen_e, binning) if generated_hlf is None else generated_hlf
    thr = binning.threshold_mev
    ref_vox = voxel_spectrum_values(ref_x, thr)
    gen_vox = voxel_spectrum_values(gen_x, thr)
    if bins is None:
        bins = challenge_bins(binning, ref_hlf, float(ref_vox.max(initial=thr)))
    separation = separation_powers(ref_hlf, gen_hlf, bins, ref_vox, gen_vox,
                                   binning.energy_ranges_mev)
    means = group_means(separation)
    fpd_result = kpd_result = None
    if distances:
        ref_v, gen_v = ref_hlf.high_level_vector(), gen_hlf.high_level_vector()
        adaptive = not official_distances
        fpd_result = fpd(ref_v, gen_v, num_batches=fpd_draws, seed=seed + 42,
                         adaptive=adaptive)
        kpd_result = kpd(ref_v, gen_v, seed=seed + 42, adaptive=adaptive)
    results: dict[str, ClassifierResult] = {}
    if classifier is not None:
        cfg = get_config(classifier)
        for kind in classifier_inputs:
            if kind == "low":
                a = low_level_inputs(ref_x, ref_e, thr)
                b = low_level_inputs(gen_x, gen_e, thr)
                # voxels / E_inc are already scale-free; per-voxel z-scores would blow
                # up the noise of nearly empty voxels (see calotune.metrics.classifier)
                results[kind] = classifier_test(a, b, cfg, seed=seed, standardize=False,
                                                device=device)
            elif kind == "high":
                a = high_level_inputs(ref_hlf, relative=cfg.relative_energies)
                b = high_level_inputs(gen_hlf, relative=cfg.relative_energies)
                results[kind] = classifier_test(a, b, cfg, seed=seed, device=device)
            else:
                raise ValueError(f"classifier input kind must be 'low' or 'high', got {kind!r}")
    return Comparison(
        separation=separation,
        separation_means=means,
        fpd=fpd_result,
        kpd=kpd_result,
        classifier=results,
        n_reference=len(reference),
        n_generated=len(generated),
    )



def layer_correlation(e_layer: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix of the layer energies over a sample, in layer order.

    The quantity of the CaloChallenge results tables ("PCC Layer Energies", arXiv
    2410.21611): ``np.corrcoef`` of E_layer over all events (all incident energies
    together), with NaN (a layer that is always empty) set to 0 off the diagonal and 1
    on it, as there.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(np.asarray(e_layer, dtype=np.float64).T)
    corr = np.atleast_2d(corr)
    corr[np.isnan(corr)] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr


def mean_offdiagonal_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a_ij - b_ij| over i != j: one number for how far two correlation matrices are."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square matrices of one shape, got {a.shape}, {b.shape}")
    off = ~np.eye(len(a), dtype=bool)
    return float(np.abs(a - b)[off].mean())

