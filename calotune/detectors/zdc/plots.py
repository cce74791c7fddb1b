"""Reference-vs-generated plots of the ZDC features that :mod:`.evaluation` scores."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.hepstyle import fixed_margins, hep_label, hep_style
from calotune.detectors.zdc.evaluation import (
    PROFILE_FEATURE,
    _compare,
    _finite_mean,
    hcal_cell_coordinates,
    zdc_features,
)
from calotune.metrics.separation import histogram
from calotune.showers import ShowerSet

__all__ = ["plot_zdc", "plot_zdc_from_features"]

logger = logging.getLogger("calotune.metrics.zdc")


_LABELS = {
    "hcal_energy_scale": "HCAL energy scale  $E_{HCAL}/E_{inc}$",
    "hcal_fraction": "HCAL fraction  $E_{HCAL}/(E_{ECAL}+E_{HCAL})$",
    "ecal_energy_scale": "ECAL energy scale  $E_{ECAL}/E_{inc}$",
    "total_energy_scale": "total energy scale  $E_{tot}/E_{inc}$",
    "centre_x": "HCAL shower centre X [mm]",
    "width_x": "HCAL shower width X [mm]",
    "centre_z": "HCAL shower centre Z (depth) [mm]",
    "width_z": "HCAL shower width Z (depth) [mm]",
}


def _draw_hist(
    ax: Any, ref: np.ndarray, gen: np.ndarray, edges: np.ndarray, name: str, sep: float
) -> None:
    """Reference vs generated step histograms (unit sum, overflow in edge bins)."""
    for values, label, colour in (
        (ref, "reference", "black"),
        (gen, f"generated  $S^2$={sep:.4f}", "tab:red"),
    ):
        counts = histogram(values, edges, overflow=True)
        fraction = counts / max(counts.sum(), 1.0)
        ax.stairs(fraction, edges, label=label, color=colour, linewidth=1.5)
    hep_label(ax, "edge bins: under/overflow")
    ax.set_xlabel(_LABELS[name])
    ax.set_ylabel("fraction of events")
    ax.legend(fontsize="small")


def plot_zdc(
    reference: ShowerSet,
    generated: ShowerSet,
    geometry: Any,
    out_dir: Path,
    *,
    n_bins: int = 50,
) -> list[Path]:
    """Reference-vs-generated PNGs of the features :func:`zdc_scores` scores.

    Uses matplotlib's object-oriented ``Figure`` (rendered by Agg) rather than pyplot, so
    it needs no display, never switches a caller's global backend and keeps nothing in
    pyplot's figure registry; drawn in the HEP style of mplhep (:func:`hep_style`).
    Matplotlib is imported here so that importing calotune stays cheap.

    Returns:
        The written files, in ``out_dir`` (created if missing): zdc_hcal_energy_scale.png,
        zdc_hcal_fraction.png, zdc_ecal_energy_scale.png, zdc_total_energy_scale.png,
        zdc_longitudinal_profile.png, zdc_centre_width.png.
    """
    return plot_zdc_from_features(zdc_features(reference, geometry), zdc_features(generated, geometry),
                                  geometry, out_dir, n_bins=n_bins)


def plot_zdc_from_features(
    ref: Mapping[str, np.ndarray],
    gen: Mapping[str, np.ndarray],
    geometry: Any,
    out_dir: Path,
    *,
    n_bins: int = 50,
) -> list[Path]:
    """:func:`plot_zdc` from the two samples' :func:`zdc_features` (the streamed path: the
    features of a sample's batches, concatenated, are the whole sample's)."""
    with hep_style():
        return _plot_zdc(ref, gen, geometry, Path(out_dir), n_bins)


def _plot_zdc(ref: Mapping[str, np.ndarray], gen: Mapping[str, np.ndarray], geometry: Any, out_dir: Path,
              n_bins: int) -> list[Path]:
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    edges, _, seps = _compare(ref, gen, n_bins)
    written: list[Path] = []

    def save(fig: Figure, stem: str) -> None:
        fixed_margins(fig)  # not a layout engine: see fixed_margins
        path = out_dir / f"zdc_{stem}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    for name in ("hcal_energy_scale", "hcal_fraction", "ecal_energy_scale", "total_energy_scale"):
        fig = Figure(figsize=(6, 4.5))
        _draw_hist(fig.add_subplot(), ref[name], gen[name], edges[name], name, seps[f"sep_{name}"])
        save(fig, name)

    # Longitudinal profile: mean energy per HCAL layer against layer depth.
    _, z = hcal_cell_coordinates(geometry)
    pitch = z[1] - z[0] if z.size > 1 else 2.0 * z[0]
    z_edges = np.append(z - 0.5 * pitch, z[-1] + 0.5 * pitch)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    sep = seps[f"sep_{PROFILE_FEATURE}"]
    for layers, label, colour in (
        (ref[PROFILE_FEATURE], "reference", "black"),
        (gen[PROFILE_FEATURE], f"generated  mean layer $S^2$={sep:.4f}", "tab:red"),
    ):
        profile = np.array([_finite_mean(layers[:, k]) for k in range(layers.shape[1])])
        ax.stairs(profile, z_edges, label=label, color=colour, linewidth=1.5)
    hep_label(ax, "longitudinal profile")
    ax.set_xlabel("HCAL depth Z [mm]")
    ax.set_ylabel("mean energy per layer [MeV]")
    ax.legend(fontsize="small")
    save(fig, "longitudinal_profile")

    fig = Figure(figsize=(10, 8))
    for i, name in enumerate(("centre_x", "width_x", "centre_z", "width_z")):
        ax = fig.add_subplot(2, 2, i + 1)
        _draw_hist(ax, ref[name], gen[name], edges[name], name, seps[f"sep_{name}"])
    save(fig, "centre_width")
    logger.debug("plot_zdc wrote %d files to %s", len(written), out_dir)
    return written
