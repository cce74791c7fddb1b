"""Physics features and scores for the ZDC (ECAL + longitudinally segmented HCAL).

The features are the quantities the ZDC group checks on every model (seed 000 slides:
"HCAL Energy Scale Distribution", "HCAL Energy Fraction (HCAL / Total)", the X-Z view of
the HCAL shower), plus the CaloChallenge-style shower shape: energy-weighted centre and
width, computed with 1e-16 added to every denominator as the CaloChallenge 2022 evaluation
does (arXiv 2410.21611). Each feature is compared between the
reference and a generated sample by the separation power (arXiv 2009.03796 eq. 15), and
the mean over features is the single objective a search minimises.

Only these geometry attributes are used, so any object carrying them works (the real
``ZDCGeometry`` or a test stand-in): ``ecal_nx, ecal_ny, hcal_nx, hcal_ny, hcal_nz`` and,
if present, the HCAL transverse cell pitch and layer pitch in mm (see
:func:`hcal_cell_coordinates`). HCAL cell order is ``reshape(N, nz, nx, ny)`` (layer first),
ECAL is ``reshape(N, nx, ny)``.

Plots live in :mod:`calotune.detectors.zdc.plots`; :mod:`calotune.metrics.zdc` re-exports
both for older imports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from calotune.metrics.separation import binning_from_reference, separation_power
from calotune.showers import ShowerSet

__all__ = [
    "PROFILE_FEATURE",
    "SCALAR_FEATURES",
    "ZDC_OBJECTIVES",
    "default_objective",
    "hcal_cell_coordinates",
    "zdc_features",
    "zdc_scores",
    "zdc_scores_from_features",
]

logger = logging.getLogger("calotune.metrics.zdc")

#: CaloChallenge's guard against empty showers (arXiv 2410.21611).
EPS = 1e-16

#: Per-event scalar features compared one histogram each.
SCALAR_FEATURES: tuple[str, ...] = (
    "hcal_energy_scale",
    "hcal_fraction",
    "ecal_energy_scale",
    "total_energy_scale",
    "centre_x",
    "width_x",
    "centre_z",
    "width_z",
)
#: (N, nz) longitudinal profile, compared layer by layer and averaged.
PROFILE_FEATURE = "hcal_layer_energy"

#: Score name -> optimisation mode. ``mean_separation`` is the combined objective; the
#: ``sep_*`` entries are its components (all minimised, 0 = indistinguishable).
ZDC_OBJECTIVES: dict[str, str] = {
    "mean_separation": "min",
    **{f"sep_{name}": "min" for name in (*SCALAR_FEATURES, PROFILE_FEATURE)},
}

# Attribute names the geometry may use for its HCAL pitches (mm), tried in order. The
# ZDCGeometry is written independently; a miss falls back to 1.0 (cell units), which leaves
# every separation power unchanged (bins follow the reference) and only rescales plot axes.
_TRANSVERSE_PITCH_NAMES = (
    "hcal_cell_mm",
    "hcal_cell_size_mm",
    "hcal_cell_x_mm",
    "hcal_dx_mm",
    "hcal_pitch_mm",
    "hcal_cell_size",
)
_LAYER_PITCH_NAMES = (
    "hcal_layer_mm",
    "hcal_layer_thickness_mm",
    "hcal_layer_pitch_mm",
    "hcal_dz_mm",
    "hcal_cell_z_mm",
    "hcal_layer_thickness",
)
_warned: set[tuple[str, str]] = set()

# Reference quantiles that set each feature's range. Trimming 0.5 % per side stops a few
# outliers from stretching the bins; overflow=True keeps the trimmed tails in the edge bins.
_QUANTILES = (0.005, 0.995)


def _pitch(geometry: Any, names: tuple[str, ...], what: str) -> float:
    """First positive attribute among ``names``, else 1.0 with a one-time warning."""
    for name in names:
        value = getattr(geometry, name, None)
        if value is not None and float(value) > 0:
            return float(value)
    key = (type(geometry).__name__, what)
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "%s has none of %s; using 1.0 (HCAL %s in cell units, not mm)",
            key[0],
            ", ".join(names),
            what,
        )
    return 1.0


def hcal_cell_coordinates(geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre coordinates (mm) of the HCAL along X and along depth Z.

    X is centred on the detector axis, x_i = (i - (nx - 1) / 2) * pitch, so a beam on the
    axis has centre_x ~ 0. Z is the depth of each layer centre from the HCAL front face,
    z_l = (l + 1/2) * layer pitch. The origin does not affect any separation power (the
    bins are derived from the reference), only plot axes.

    Returns:
        (x of shape (hcal_nx,), z of shape (hcal_nz,)), float64.
    """
    dx = _pitch(geometry, _TRANSVERSE_PITCH_NAMES, "transverse pitch")
    dz = _pitch(geometry, _LAYER_PITCH_NAMES, "layer pitch")
    nx, nz = int(geometry.hcal_nx), int(geometry.hcal_nz)
    x = (np.arange(nx, dtype=np.float64) - 0.5 * (nx - 1)) * dx
    z = (np.arange(nz, dtype=np.float64) + 0.5) * dz
    return x, z


def _centre_width(
    energy: np.ndarray, coord: np.ndarray, total: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and RMS width along one axis (CaloChallenge definition).

    energy: (N, n) energy projected on the axis; coord: (n,); total: (N,) its sum.
    width = sqrt(max(<x^2> - <x>^2, 0)): the clip absorbs rounding for one-cell showers.
    """
    centre = energy @ coord / (total + EPS)
    second = energy @ coord**2 / (total + EPS)
    width = np.sqrt(np.maximum(second - centre**2, 0.0))
    return centre, width


def zdc_features(showers: ShowerSet, geometry: Any) -> dict[str, np.ndarray]:
    """Per-event physics features of a ZDC sample.

    Accumulated in float64: widths are a difference of two moments, which loses most of its
    digits in float32 for narrow showers.

    Returns:
        name -> array. Scalars (N,): ``hcal_energy_scale`` = E_HCAL / E_inc,
        ``hcal_fraction`` = E_HCAL / (E_ECAL + E_HCAL), ``ecal_energy_scale`` = E_ECAL / E_inc,
        ``total_energy_scale`` = (E_ECAL + E_HCAL) / E_inc, ``centre_x`` / ``width_x``
        (transverse, mm, over all HCAL cells), ``centre_z`` / ``width_z`` (depth, mm).
        Profile (N, hcal_nz): ``hcal_layer_energy`` in MeV. Empty showers give 0, not NaN.

    Raises:
        ValueError: if the cell arrays do not match the geometry's cell counts.
    """
    nx, ny, nz = int(geometry.hcal_nx), int(geometry.hcal_ny), int(geometry.hcal_nz)
    n_ecal = int(geometry.ecal_nx) * int(geometry.ecal_ny)
    # No float64 copy of the cells (10^4 events x 3600 HCAL cells is 288 MB in float64):
    # the sums below accumulate in float64 instead.
    hcal = np.asarray(showers.cells["hcal"])
    ecal = np.asarray(showers.cells["ecal"])
    n = len(showers)
    if hcal.shape != (n, nx * ny * nz):
        raise ValueError(
            f"cells['hcal'] has shape {hcal.shape}, geometry needs (N, {nx * ny * nz})"
        )
    if ecal.shape != (n, n_ecal):
        raise ValueError(f"cells['ecal'] has shape {ecal.shape}, geometry needs (N, {n_ecal})")
    e_inc = np.asarray(showers.conditions["energy"], dtype=np.float64).reshape(n)

    voxels = hcal.reshape(n, nz, nx, ny)
    layer_energy = voxels.sum(axis=(2, 3), dtype=np.float64)  # (N, nz)
    x_energy = voxels.sum(axis=(1, 3), dtype=np.float64)  # (N, nx)
    e_hcal = layer_energy.sum(axis=1)
    e_ecal = ecal.sum(axis=1, dtype=np.float64)

    x, z = hcal_cell_coordinates(geometry)
    centre_x, width_x = _centre_width(x_energy, x, e_hcal)
    centre_z, width_z = _centre_width(layer_energy, z, e_hcal)
    return {
        "hcal_energy_scale": e_hcal / (e_inc + EPS),
        "hcal_fraction": e_hcal / (e_ecal + e_hcal + EPS),
        "ecal_energy_scale": e_ecal / (e_inc + EPS),
        "total_energy_scale": (e_ecal + e_hcal) / (e_inc + EPS),
        "centre_x": centre_x,
        "width_x": width_x,
        "centre_z": centre_z,
        "width_z": width_z,
        PROFILE_FEATURE: layer_energy,
    }


def _finite_mean(values: np.ndarray) -> float:
    """Mean over finite entries; 0.0 when there are none, so scores stay loggable."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        logger.warning("no finite values to average; reporting 0.0")
        return 0.0
    return float(v.mean())


def _compare(
    ref: Mapping[str, np.ndarray], gen: Mapping[str, np.ndarray], n_bins: int
) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, float]]:
    """Reference-fixed bin edges and separation powers for every feature.

    Shared by :func:`zdc_scores` and :func:`plot_zdc` so the plots show exactly the
    histograms that were scored. overflow=True: a search must not be able to hide mass
    outside the reference range (the CaloChallenge default would drop it unpenalised).

    Returns:
        (scalar feature -> edges, per-layer edges, "sep_<feature>" -> separation power).
    """
    edges: dict[str, np.ndarray] = {}
    seps: dict[str, float] = {}
    for name in SCALAR_FEATURES:
        edges[name] = binning_from_reference(ref[name], n_bins, quantiles=_QUANTILES)
        seps[f"sep_{name}"] = separation_power(ref[name], gen[name], edges[name], overflow=True)
    # Layer energies span decades: log bins (as CaloChallenge's E_layer); zero deposits fall
    # below the first edge and land, via overflow, in the first bin.
    ref_layers, gen_layers = ref[PROFILE_FEATURE], gen[PROFILE_FEATURE]
    layer_edges = [
        binning_from_reference(ref_layers[:, k], n_bins, log=True, quantiles=_QUANTILES)
        for k in range(ref_layers.shape[1])
    ]
    layer_seps = [
        separation_power(ref_layers[:, k], gen_layers[:, k], e, overflow=True)
        for k, e in enumerate(layer_edges)
    ]
    seps[f"sep_{PROFILE_FEATURE}"] = float(np.mean(layer_seps)) if layer_seps else 0.0
    return edges, layer_edges, seps


def zdc_scores(
    reference: ShowerSet, generated: ShowerSet, geometry: Any, *, n_bins: int = 50
) -> dict[str, float]:
    """Separation powers of ``generated`` against ``reference``, and their mean.

    Bins are fixed from the reference alone (trimmed 0.5 %-99.5 % quantile range, with
    out-of-range values counted in the edge bins), so for a fixed reference every trial is
    scored on identical histograms. Keep the reference sample fixed across a search: with
    n_bins bins and N events per sample, two samples of one distribution already score
    about n_bins / (2 N) per feature (0.025 for 50 bins and 1000 events).

    Returns:
        Every key of :data:`ZDC_OBJECTIVES` (``sep_<feature>`` for each scalar feature,
        ``sep_hcal_layer_energy`` = mean over layers, ``mean_separation`` = mean of all
        ``sep_*``), plus informative, non-objective means ``ref_/gen_hcal_energy_scale_mean``
        and ``ref_/gen_hcal_fraction_mean``. All finite Python floats.

    Raises:
        ValueError: if the reference is empty (no binning can be derived from it).
    """
    if len(reference) == 0:
        raise ValueError("zdc_scores needs a non-empty reference sample")
    return zdc_scores_from_features(zdc_features(reference, geometry), zdc_features(generated, geometry),
                                    n_bins=n_bins)


def zdc_scores_from_features(
    ref: Mapping[str, np.ndarray], gen: Mapping[str, np.ndarray], *, n_bins: int = 50
) -> dict[str, float]:
    """:func:`zdc_scores` from the two samples' :func:`zdc_features` (which are per event, so
    the features of a sample's batches, concatenated, score exactly as the whole sample's:
    the streamed path of :func:`calotune.sampling.score_streamed`).

    Raises:
        ValueError: if the reference is empty (no binning can be derived from it).
    """
    if len(ref["hcal_energy_scale"]) == 0:
        raise ValueError("zdc_scores needs a non-empty reference sample")
    _, _, seps = _compare(ref, gen, n_bins)
    scores: dict[str, float] = {"mean_separation": float(np.mean(list(seps.values())))}
    scores.update(seps)
    for name in ("hcal_energy_scale", "hcal_fraction"):
        scores[f"ref_{name}_mean"] = _finite_mean(ref[name])
        scores[f"gen_{name}_mean"] = _finite_mean(gen[name])
    return scores


def default_objective() -> tuple[str, str]:
    """The ZDC search objective: the mean separation power over every feature, minimised."""
    return "mean_separation", "min"
