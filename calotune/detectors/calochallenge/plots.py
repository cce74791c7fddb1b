"""CaloChallenge plots: reference-vs-generated histograms on the scoring binnings, and
layer-correlation matrices against Geant4."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calotune.detectors.base import Summary
from calotune.detectors.calochallenge.evaluation import (
    VOXEL_ENERGY,
    hlf_of,
    mean_offdiagonal_difference,
    summarise,
)
from calotune.metrics.hlf import (
    Binning,
    HighLevelFeatures,
    challenge_bins,
    separation_powers,
)
from calotune.showers import ShowerSet

__all__ = ["plot_comparison", "plot_detector", "plot_layer_correlations", "plot_summaries"]


def _ridgeline(ax: Any, ref: np.ndarray, gen: np.ndarray, edges: list[np.ndarray],
               ids: Sequence[int], log_x: bool, separation: Sequence[float] | None) -> None:
    """All layers' unit-sum histograms stacked on one axes, one row per layer.

    One axes instead of a 45-panel grid: matplotlib spends its time per axes (ticks,
    layout), and a grid made the ds2 report's plots take minutes.
    """

    def norm_hist(values: np.ndarray, e: np.ndarray) -> np.ndarray:
        counts, _ = np.histogram(values[np.isfinite(values)], bins=e)
        total = counts.sum()
        return counts / total if total else counts.astype(float)

    x_right = -np.inf
    for j in range(len(ids)):
        e = edges[j]
        x = np.repeat(np.log10(e) if log_x else e, 2)[1:-1]
        h_ref, h_gen = norm_hist(ref[:, j], e), norm_hist(gen[:, j], e)
        top = max(h_ref.max(initial=0.0), h_gen.max(initial=0.0)) or 1.0
        ax.plot(x, j + 0.9 * np.repeat(h_ref, 2) / top, color="0.55", linewidth=1.8)
        ax.plot(x, j + 0.9 * np.repeat(h_gen, 2) / top, color="C3", linewidth=0.8)
        x_right = max(x_right, float(x[-1]))
    if separation:
        for j, value in enumerate(separation):
            ax.text(1.01, (j + 0.3) / len(ids), f"{value:.3f}", fontsize=6,
                    transform=ax.transAxes)
    step = max(1, len(ids) // 15)
    ax.set_yticks(np.arange(0, len(ids), step), [str(i) for i in ids[::step]], fontsize=7)
    ax.set_ylim(0, len(ids))
    ax.set_ylabel("layer")
    ax.tick_params(axis="x", labelsize=7)


def _draw(ax: Any, ref: np.ndarray, gen: np.ndarray, edges: np.ndarray, log_x: bool,
          title: str, s2: float | None) -> None:
    """Unit-sum histograms of both samples on the scoring edges (log edges drawn against
    log10 x on a linear axis, which keeps the scored bins equal-width on the plot)."""

    def norm_hist(values: np.ndarray) -> np.ndarray:
        counts, _ = np.histogram(values[np.isfinite(values)], bins=edges)
        total = counts.sum()
        return counts / total if total else counts.astype(float)

    x_step = np.repeat(np.log10(edges) if log_x else edges, 2)[1:-1]
    ax.plot(x_step, np.repeat(norm_hist(ref), 2), color="0.55", linewidth=2.0,
            label="reference")
    ax.plot(x_step, np.repeat(norm_hist(gen), 2), color="C3", linewidth=1.0,
            label="generated")
    ax.set_title(title if s2 is None else f"{title}  S²={s2:.3f}", fontsize=8)


def plot_comparison(
    reference: HighLevelFeatures,
    generated: HighLevelFeatures,
    bins: dict[str, list[np.ndarray]],
    out_dir: Path,
    *,
    separation: dict[str, list[float]] | None = None,
    reference_voxels: np.ndarray | None = None,
    generated_voxels: np.ndarray | None = None,
) -> list[Path]:
    """Reference-vs-generated histograms on the scoring binnings, one PNG per feature.

    Drawn with matplotlib's object API on Agg canvases (no pyplot state), so it is safe
    inside worker processes and never opens a window.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sep = separation or {}
    paths: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        path = out_dir / f"{name}.png"
        # constrained layout keeps every label inside; a hand-laid figure is cropped to them
        fig.savefig(path, dpi=80, bbox_inches="tight" if fig.get_layout_engine() is None else None)
        paths.append(path)

    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, reference.etot_einc, generated.etot_einc, bins["etot_einc"][0], False,
          r"$E_\mathrm{tot}/E_\mathrm{inc}$", (sep.get("etot_einc") or [None])[0])
    ax.set_xlabel(r"$E_\mathrm{tot}/E_\mathrm{inc}$")
    ax.legend(fontsize=7)
    save(fig, "etot_einc")

    labels = {
        "e_layer": r"$\log_{10} E_\mathrm{layer}$ [MeV]", "ec_eta": "EC eta [mm]", "ec_phi": "EC phi [mm]",
        "ec_r": "EC r [mm]", "width_eta": "width eta [mm]", "width_phi": "width phi [mm]",
        "width_r": "width r [mm]", "sparsity": "sparsity",
    }
    for name, label in labels.items():
        ref, ids = reference.layer_feature(name)
        gen, _ = generated.layer_feature(name)
        if not ids:
            continue
        fig = Figure(figsize=(7, 1.5 + 0.28 * len(ids)))  # laid out by hand (subplots_adjust)
        _ridgeline(fig.add_subplot(), ref, gen, bins[name], ids, name == "e_layer",
                   sep.get(name))
        fig.suptitle(f"{label} per layer: reference (grey) vs generated (red), S² at right",
                     fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.88, bottom=0.08, top=0.94)
        save(fig, name)

    if reference_voxels is not None and generated_voxels is not None and "voxel_energy" in bins:
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.add_subplot()
        _draw(ax, reference_voxels, generated_voxels, bins["voxel_energy"][0], True,
              "voxel energy", (sep.get("voxel_energy") or [None])[0])
        ax.set_yscale("log")
        ax.set_xlabel("log10 voxel energy [MeV]")
        ax.legend(fontsize=7)
        save(fig, "voxel_energy")

    fig = Figure(figsize=(9, 6), layout="constrained")
    for k, name in enumerate(("e_layer", "ec_r", "width_r", "sparsity")):
        ax = fig.add_subplot(2, 2, k + 1)
        for sample, style in ((reference, "-"), (generated, "--")):
            values, ids = sample.layer_feature(name)
            ax.plot(ids, values.mean(axis=0), style,
                    label="reference" if sample is reference else "generated")
        unit = "" if name == "sparsity" else (" [MeV]" if name == "e_layer" else " [mm]")
        ax.set_title(f"mean {name}{unit} per layer", fontsize=8)
        if name == "e_layer":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    save(fig, "layer_profiles")
    return paths



def plot_layer_correlations(synthetic: np.ndarray, geant4: np.ndarray,
                            layer_ids: Sequence[int], title: str, path: Path) -> Path:
    """Synthetic, Geant4 and difference correlation matrices side by side (one PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    diff = synthetic - geant4
    panels = ((synthetic, "synthetic (calotune)", "viridis", (-1, 1)),
              (geant4, "Geant4 (CaloChallenge results)", "viridis", (-1, 1)),
              (diff, "synthetic - Geant4", "coolwarm", (-1, 1)))
    step = max(1, len(layer_ids) // 9)
    for k, (matrix, label, cmap, (lo, hi)) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
        ax.set_title(label, fontsize=9)
        ticks = np.arange(0, len(layer_ids), step)
        ax.set_xticks(ticks, [str(layer_ids[t]) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(layer_ids[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{title}: mean |off-diagonal difference| = "
                 f"{mean_offdiagonal_difference(synthetic, geant4):.3f}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path



def plot_detector(binning: Binning, reference: ShowerSet, generated: ShowerSet, out_dir: Path) -> list[Path]:
    """Every scored histogram of ``generated`` against ``reference`` (the detector's ``plot``)."""
    return plot_summaries(binning, summarise(binning, reference, low_level=False),
                          summarise(binning, generated, low_level=False), out_dir)


def plot_summaries(binning: Binning, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
    """:func:`plot_detector` from the two samples' summaries (:func:`.evaluation.summarise`;
    the low-level classifier inputs are not used)."""
    ref_hlf, gen_hlf = hlf_of(reference), hlf_of(generated)
    thr = binning.threshold_mev
    ref_vox, gen_vox = reference.pooled[VOXEL_ENERGY], generated.pooled[VOXEL_ENERGY]
    bins = challenge_bins(binning, ref_hlf, float(ref_vox.max(initial=thr)))
    separation = separation_powers(ref_hlf, gen_hlf, bins, ref_vox, gen_vox,
                                   binning.energy_ranges_mev)
    return plot_comparison(ref_hlf, gen_hlf, bins, Path(out_dir), separation=separation,
                           reference_voxels=ref_vox, generated_voxels=gen_vox)
