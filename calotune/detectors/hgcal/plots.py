"""Reference-vs-generated plots of the HGCal features that :mod:`.evaluation` scores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.hgcal.evaluation import (
    ENERGY_BINNED,
    SCALAR_FEATURES,
    Features,
    compare,
    energy_bin_edges,
    features,
    n_bins_for,
)
from calotune.detectors.hgcal.geometry import HGCalGeometry
from calotune.metrics.separation import binning_from_reference, histogram
from calotune.pointclouds import PointCloudSet

__all__ = ["plot_hgcal", "plot_hgcal_from_features"]

log = logging.getLogger("calotune.detectors.hgcal")

_LABELS = {
    "hits_per_event": "hits per event",
    "radius": "energy-weighted radius [mm]",
    "energy_ratio": "$E_{vis}/E_{inc}$",
    "centre_z": "energy-weighted depth [mm]",
    "width_z": "depth RMS [mm]",
    "width_r": "radial RMS [mm]",
}


def _binned_profile(energy: np.ndarray, values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``values`` in each incident-energy bin."""
    which = np.searchsorted(edges, energy, side="right") - 1
    mean = np.array([values[which == k].mean() if (which == k).any() else np.nan for k in range(len(edges) - 1)])
    std = np.array([values[which == k].std() if (which == k).any() else np.nan for k in range(len(edges) - 1)])
    return mean, std


def _vs_energy(ax: Any, ref: Features, gen: Features, name: str, seps: list[float]) -> None:
    """The feature's mean +- std per log-spaced incident-energy bin, reference vs generated."""
    lo, hi = np.log10(max(ref.energy.min(), 1.0)), np.log10(max(ref.energy.max(), 10.0))
    edges = np.logspace(lo, hi + 1e-9, 9)
    centres = np.sqrt(edges[1:] * edges[:-1]) / 1e3
    for f, label, colour in ((ref, "reference", "black"), (gen, "generated", "tab:red")):
        mean, std = _binned_profile(f.energy, f.scalars[name], edges)
        ax.errorbar(centres, mean, yerr=std, label=label, color=colour, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("incident energy [GeV]")
    ax.set_ylabel(_LABELS[name])
    text = ", ".join(f"{s:.3f}" for s in seps)
    ax.set_title(f"$S^2$ per energy quartile: {text}", fontsize="small")
    ax.legend(fontsize="small")


def plot_hgcal(reference: PointCloudSet, generated: PointCloudSet, g: HGCalGeometry, out_dir: Path) -> list[Path]:
    """PNGs in ``out_dir``: hgcal_hits_vs_energy.png, hgcal_radius_vs_energy.png (the
    thesis's two failures), hgcal_features.png (every scalar feature's histogram) and
    hgcal_longitudinal_profile.png. Matplotlib's object-oriented Figure (no pyplot state),
    so it is safe in Ray workers and leaves a caller's backend alone."""
    return plot_hgcal_from_features(features(reference, g), features(generated, g), g, out_dir)


def plot_hgcal_from_features(ref: Features, gen: Features, g: HGCalGeometry, out_dir: Path) -> list[Path]:
    """:func:`plot_hgcal` from the two samples' :func:`.evaluation.features` (the streamed path)."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = compare(ref, gen)
    written: list[Path] = []

    def save(fig: Figure, stem: str) -> None:
        path = out_dir / f"hgcal_{stem}.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    for name, stem in zip(ENERGY_BINNED, ("hits_vs_energy", "radius_vs_energy"), strict=True):
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        _vs_energy(fig.add_subplot(), ref, gen, name, result.per_energy_bin[name])
        save(fig, stem)

    names = (*ENERGY_BINNED, *SCALAR_FEATURES)
    fig = Figure(figsize=(12, 7), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(2, 3, i + 1)
        edges = binning_from_reference(ref.scalars[name], n_bins_for(len(ref.energy)), quantiles=(0.005, 0.995))
        for f, label, colour in ((ref, "reference", "black"), (gen, "generated", "tab:red")):
            counts = histogram(f.scalars[name], edges, overflow=True)
            ax.stairs(counts / max(counts.sum(), 1.0), edges, label=label, color=colour)
        ax.set_xlabel(_LABELS[name])
        ax.set_title(f"$S^2$={result.seps[f'sep_{name}']:.3f} (edge bins: overflow)", fontsize="small")
        ax.legend(fontsize="x-small")
    save(fig, "features")

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    z = g.z_centres()
    z_edges = np.append(z - g.layer_mm / 2, z[-1] + g.layer_mm / 2)
    for f, label, colour in ((ref, "reference", "black"), (gen, "generated", "tab:red")):
        ax.stairs(f.layer_energy.mean(axis=0), z_edges, label=label, color=colour)
    ax.set_xlabel("depth [mm]")
    ax.set_ylabel("mean energy per layer [MeV]")
    ax.set_title(f"mean layer $S^2$={result.seps['sep_layer_energy']:.3f}", fontsize="small")
    ax.legend(fontsize="small")
    save(fig, "longitudinal_profile")
    log.debug("plot_hgcal wrote %d files to %s (energy bins %s)", len(written), out_dir,
              energy_bin_edges(ref.energy))
    return written
