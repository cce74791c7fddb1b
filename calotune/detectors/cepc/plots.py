"""Reference-vs-generated plots of the CEPC ECAL features that :mod:`.evaluation` scores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from calotune.detectors.cepc.evaluation import RING_EDGES, SCALARS, cepc_features
from calotune.detectors.cepc.geometry import CEPCGeometry
from calotune.metrics.separation import binning_from_reference, histogram
from calotune.pointclouds import PointCloudSet

__all__ = ["plot_cepc", "plot_cepc_from_features"]

_LABELS = {
    "n_cells": "fired cells per event", "e_ratio": "$E_{tot}/E_{inc}$", "centre_r": "centre R [mm]",
    "width_r": "width R [mm]", "width_phi": r"width $r\phi$ [mm]", "width_z": "width z [mm]",
}


def plot_cepc(reference: PointCloudSet, generated: PointCloudSet, g: CEPCGeometry, out_dir: Path) -> list[Path]:
    """PNGs: the scalar features (one panel each), the mean layer profile and the mean
    lateral profile; matplotlib's object API (no pyplot state, safe in Ray workers)."""
    return plot_cepc_from_features(cepc_features(reference, g), cepc_features(generated, g), g, out_dir)


def plot_cepc_from_features(ref: Mapping[str, np.ndarray], gen: Mapping[str, np.ndarray], g: CEPCGeometry,
                            out_dir: Path) -> list[Path]:
    """:func:`plot_cepc` from the two samples' :func:`.evaluation.cepc_features` (the streamed
    path: a summary's ``events`` hold them)."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fig = Figure(figsize=(12, 7), layout="constrained")
    for i, name in enumerate(SCALARS):
        ax = fig.add_subplot(2, 3, i + 1)
        edges = binning_from_reference(ref[name], 40, quantiles=(0.005, 0.995))
        for values, label, colour in ((ref[name], "reference", "black"), (gen[name], "generated", "tab:red")):
            counts = histogram(values, edges, overflow=True)
            ax.stairs(counts / max(counts.sum(), 1.0), edges, label=label, color=colour)
        ax.set_xlabel(_LABELS[name])
        ax.legend(fontsize="small")
    written.append(out_dir / "cepc_scalars.png")
    fig.savefig(written[-1], dpi=90)

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    for f, label, colour in ((ref, "reference", "black"), (gen, "generated", "tab:red")):
        ax.stairs(f["layer_energy"].mean(0), np.arange(g.bins_r + 1), label=label, color=colour)
    ax.set_xlabel("R bin (layer)")
    ax.set_ylabel("mean energy [MeV]")
    ax.legend(fontsize="small")
    ax = fig.add_subplot(1, 2, 2)
    rings = np.arange(len(RING_EDGES))
    for f, label, colour in ((ref, "reference", "black"), (gen, "generated", "tab:red")):
        ax.stairs(f["radial_profile"].mean(0), rings, label=label, color=colour)
    ax.set_xticks(rings, [f"{e:g}" for e in RING_EDGES])
    ax.set_xlabel("distance from the axis [cell widths]")
    ax.set_ylabel("mean energy fraction")
    ax.legend(fontsize="small")
    written.append(out_dir / "cepc_profiles.png")
    fig.savefig(written[-1], dpi=90)
    return written
