"""CaloChallenge scores: separation powers, FPD / KPD and the classifier test, with the
official arithmetic (arXiv 2410.21611; separation power arXiv 2009.03796 eq. 15; FPD/KPD
arXiv 2211.10295), and the layer-correlation comparison against Geant4.

Every number is computed from a :class:`~calotune.detectors.base.Summary` of each sample
(:func:`summarise`): the high-level features per event, the voxel-energy spectrum's values
and, for the low-level classifier only, its inputs ``[log10 E_inc, voxels / E_inc]`` per
event. Those inputs are the one part that is as large as the cells: the classifier trains
on every event's voxels (arXiv 2410.21611), so a streamed score keeps them, (N, n_voxels
+ 1) float32 per sample, about the size of the sample itself (ds3: 162 kB an event), and
drops them before plotting (:meth:`Summary.for_plots`). Everything else is a few kB an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calotune.detectors.base import Summary
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
    "HLF_FIELDS",
    "LOW_LEVEL",
    "OBJECTIVES",
    "Comparison",
    "compare",
    "compare_summaries",
    "default_objective",
    "hlf_of",
    "layer_correlation",
    "mean_offdiagonal_difference",
    "summarise",
]

#: The per-event arrays of :class:`HighLevelFeatures`, kept under these names in a Summary.
HLF_FIELDS: tuple[str, ...] = ("e_inc", "e_tot", "e_layer", "sparsity", "ec_eta", "ec_phi",
                               "width_eta", "width_phi", "ec_r", "width_r")
#: Summary.events name of the low-level classifier inputs (cell-sized, "heavy").
LOW_LEVEL = "low_level_inputs"
#: Summary.pooled name of the voxel energies at or above threshold (the spectrum's values).
VOXEL_ENERGY = "voxel_energy"

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


def summarise(binning: Binning, showers: ShowerSet, *, low_level: bool = True,
              meta: dict[str, Any] | None = None) -> Summary:
    """What :func:`compare_summaries` needs of a sample, event by event.

    HLF (:func:`~calotune.metrics.hlf.compute_hlf`, per event), the voxel energies at or
    above threshold (:func:`~calotune.metrics.hlf.voxel_spectrum_values`, in event order)
    and, if ``low_level``, the low-level classifier inputs (per event, marked heavy). All
    are computed row by row, so the summaries of a sample's batches concatenate into the
    whole sample's, bit for bit.
    """
    x, e = showers.cells["showers"], showers.conditions["energy"]
    hlf = compute_hlf(x, e, binning)
    events = {name: getattr(hlf, name) for name in HLF_FIELDS}
    if low_level:
        events[LOW_LEVEL] = low_level_inputs(x, e, binning.threshold_mev)
    return Summary(
        len(hlf), events, {VOXEL_ENERGY: voxel_spectrum_values(x, binning.threshold_mev)},
        meta={"layer_ids": hlf.layer_ids, "alpha_layer_ids": hlf.alpha_layer_ids, **(meta or {})},
        heavy=frozenset({LOW_LEVEL}) if low_level else frozenset(),
    )


def hlf_of(summary: Summary) -> HighLevelFeatures:
    """The :class:`HighLevelFeatures` held by a summary (views, no copy)."""
    return HighLevelFeatures(**{name: summary.events[name] for name in HLF_FIELDS},
                             layer_ids=tuple(summary.meta["layer_ids"]),
                             alpha_layer_ids=tuple(summary.meta["alpha_layer_ids"]))


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
    need_low = classifier is not None and "low" in classifier_inputs

    def summary(sample: ShowerSet, hlf: HighLevelFeatures | None) -> Summary:
        if hlf is None:
            return summarise(binning, sample, low_level=need_low)
        x, e = sample.cells["showers"], sample.conditions["energy"]
        events = {name: getattr(hlf, name) for name in HLF_FIELDS}
        if need_low:
            events[LOW_LEVEL] = low_level_inputs(x, e, binning.threshold_mev)
        return Summary(len(hlf), events, {VOXEL_ENERGY: voxel_spectrum_values(x, binning.threshold_mev)},
                       meta={"layer_ids": hlf.layer_ids, "alpha_layer_ids": hlf.alpha_layer_ids})

    return compare_summaries(
        binning, summary(reference, reference_hlf), summary(generated, generated_hlf), bins=bins,
        classifier=classifier, classifier_inputs=classifier_inputs, distances=distances,
        fpd_draws=fpd_draws, seed=seed, device=device, official_distances=official_distances)


def compare_summaries(
    binning: Binning,
    reference: Summary,
    generated: Summary,
    *,
    bins: dict[str, list[np.ndarray]] | None = None,
    classifier: str | ClassifierConfig | None = "fast",
    classifier_inputs: Sequence[str] = ("low", "high"),
    distances: bool = True,
    fpd_draws: int = 20,
    seed: int = 0,
    device: str = "cpu",
    official_distances: bool = True,
) -> Comparison:
    """:func:`compare` from the two samples' :func:`summarise` (same options, same numbers).

    The low-level classifier needs both summaries made with ``low_level=True``.
    """
    ref_hlf, gen_hlf = hlf_of(reference), hlf_of(generated)
    thr = binning.threshold_mev
    ref_vox, gen_vox = reference.pooled[VOXEL_ENERGY], generated.pooled[VOXEL_ENERGY]
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
                missing = [name for name, sm in (("reference", reference), ("generated", generated))
                           if LOW_LEVEL not in sm.events]
                if missing:
                    raise ValueError(f"the low-level classifier needs the {' and '.join(missing)} "
                                     f"summary made with summarise(..., low_level=True)")
                a, b = reference.events[LOW_LEVEL], generated.events[LOW_LEVEL]
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

