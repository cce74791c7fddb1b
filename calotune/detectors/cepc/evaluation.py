"""CEPC ECAL features and scores on point clouds, after binning onto the cylindrical grid.

Features per event (the CEPC group's checks, seed 001, and the CaloChallenge shower
shapes, arXiv 2410.21611):

- ``n_cells``: fired cells (hits) per event; ``e_ratio``: E_tot / E_inc (the seed's
  "Total Energy: Real 37.05, Gen 43.63");
- ``layer_energy``: energy per R bin of the metric binning (``bins_r``, default one per
  layer): the longitudinal profile, compared bin by bin and averaged;
- ``centre_r``, ``width_r``: energy-weighted mean and RMS of R (mm);
- ``radial_profile``: energy fractions in rings of transverse distance from the particle's
  axis (in readout-cell widths), the lateral shape;
- ``phi_profile``: energy fractions in metric phi bins at offsets -2..2 from the bin the
  axis enters, and ``width_phi``, ``width_z``: energy-weighted RMS (mm) of r phi and z;
- ``cell_energy``: the spectrum of hit energies (all hits pooled).

Each feature is compared by the separation power (arXiv 2009.03796 eq. 15) on bins fixed
from the reference; ``mean_separation`` is the mean over features. Plus diagnostics of
mode collapse (seed 001: every generated cell at one position): ``duplicate_fraction``,
events that repeat another event's hits exactly, and the mean and spread of E_tot / E_inc.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from calotune.detectors.base import Summary
from calotune.detectors.cepc.geometry import CEPCGeometry, impact, metric_bins
from calotune.metrics.separation import binning_from_reference, separation_power
from calotune.pointclouds import PointCloudSet

__all__ = ["OBJECTIVES", "PROFILES", "SCALARS", "cepc_features", "cepc_scores", "duplicate_fraction",
           "duplicate_fraction_of_keys", "event_keys", "scores_from_summaries", "summarise"]

EPS = 1e-16
SCALARS = ("n_cells", "e_ratio", "centre_r", "width_r", "width_phi", "width_z")
#: profile features: (N, k) arrays compared column by column.
PROFILES = ("layer_energy", "radial_profile", "phi_profile")
#: ring edges of the radial profile, in readout-cell widths from the axis.
RING_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)
PHI_OFFSETS = (-2, -1, 0, 1, 2)
OBJECTIVES: dict[str, str] = {
    "mean_separation": "min",
    **{f"sep_{n}": "min" for n in (*SCALARS, *PROFILES, "cell_energy")},
    "duplicate_fraction": "min",
}
_QUANTILES = (0.005, 0.995)
#: Summary.events name of the per-event duplicate keys (:func:`event_keys`).
KEYS = "event_key"


def _weighted(values: np.ndarray, weights: np.ndarray, event: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-event energy-weighted mean and RMS width of ``values`` (CaloChallenge definition)."""
    total = np.bincount(event, weights=weights, minlength=n) + EPS
    mean = np.bincount(event, weights=weights * values, minlength=n) / total
    second = np.bincount(event, weights=weights * values**2, minlength=n) / total
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


def cepc_features(cloud: PointCloudSet, g: CEPCGeometry) -> dict[str, np.ndarray]:
    """Per-event features (see the module docstring), float64; empty events give zeros."""
    n = len(cloud)
    hits = np.asarray(cloud.hits, np.float64)
    event = np.repeat(np.arange(n), cloud.counts)
    e = hits[:, 3]
    e_inc = np.asarray(cloud.conditions["energy"], np.float64)
    total = np.bincount(event, weights=e, minlength=n)
    ir, _, iphi = metric_bins(g, hits[:, :3])
    layer = np.bincount(event * g.bins_r + ir, weights=e, minlength=n * g.bins_r).reshape(n, g.bins_r)
    r = np.hypot(hits[:, 0], hits[:, 1])
    centre_r, width_r = _weighted(r, e, event, n)
    # distance from the particle's straight line through the origin
    p = np.column_stack([cloud.conditions[k] for k in ("px", "py", "pz")]).astype(np.float64)
    unit = p / (np.linalg.norm(p, axis=1, keepdims=True) + EPS)
    along = np.einsum("ij,ij->i", hits[:, :3], unit[event])
    dist = np.linalg.norm(hits[:, :3] - along[:, None] * unit[event], axis=1) / g.cell_mm
    ring = np.searchsorted(np.asarray(RING_EDGES[1:-1]), dist, side="right")
    rings = np.bincount(event * (len(RING_EDGES) - 1) + ring, weights=e,
                        minlength=n * (len(RING_EDGES) - 1)).reshape(n, -1)
    phi0, _ = impact(g, p[:, 0], p[:, 1], p[:, 2])
    axis_bin = np.floor(phi0 / (2 * math.pi) * g.bins_phi).astype(np.int64)
    offset = (iphi - axis_bin[event] + g.bins_phi // 2) % g.bins_phi - g.bins_phi // 2
    lo, k = PHI_OFFSETS[0], len(PHI_OFFSETS)
    ok = (offset >= lo) & (offset < lo + k)
    phis = np.bincount(event[ok] * k + offset[ok] - lo, weights=e[ok], minlength=n * k).reshape(n, k)
    phi = np.arctan2(hits[:, 1], hits[:, 0])
    dphi = (phi - phi0[event] + math.pi) % (2 * math.pi) - math.pi
    _, width_phi = _weighted(dphi * g.inner_radius_mm, e, event, n)
    _, width_z = _weighted(hits[:, 2], e, event, n)
    norm = (total + EPS)[:, None]
    return {
        "n_cells": cloud.counts.astype(np.float64),
        "e_ratio": total / (e_inc + EPS),
        "centre_r": centre_r,
        "width_r": width_r,
        "width_phi": width_phi,
        "width_z": width_z,
        "layer_energy": layer,
        "radial_profile": rings / norm,
        "phi_profile": phis / norm,
    }


def event_keys(cloud: PointCloudSet, decimals: int = 3) -> np.ndarray:
    """(N, 16) uint8: a 128-bit BLAKE2b digest of each event's hits rounded to ``decimals``.

    Two events get one key exactly when their rounded hits are the same bytes (a collision
    of the 128-bit digest has probability ~N^2 / 2^129, nil for any sample), so
    :func:`duplicate_fraction_of_keys` counts what comparing the hits would, while a
    streamed score keeps 16 bytes per event instead of every hit.
    """
    n = len(cloud)
    out = np.empty((n, 16), np.uint8)
    for i in range(n):
        digest = hashlib.blake2b(np.round(cloud.event(i), decimals).tobytes(), digest_size=16).digest()
        out[i] = np.frombuffer(digest, np.uint8)
    return out


def duplicate_fraction_of_keys(keys: np.ndarray) -> float:
    """Fraction of events whose key (:func:`event_keys`) another event shares."""
    if len(keys) < 2:
        return 0.0
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def duplicate_fraction(cloud: PointCloudSet, decimals: int = 3) -> float:
    """Fraction of events whose hits (rounded) repeat another event's exactly: 0 for any
    physical sample, 1 for a generator that emits one shower whatever it is asked."""
    return duplicate_fraction_of_keys(event_keys(cloud, decimals))


def summarise(cloud: PointCloudSet, g: CEPCGeometry, meta: dict[str, Any] | None = None) -> Summary:
    """What :func:`scores_from_summaries` needs, event by event: :func:`cepc_features`, the
    :func:`event_keys` (duplicates) and the hit energies pooled in event order (a copy:
    4 bytes a hit, so a batch's hits are not kept alive by a view)."""
    events = {**cepc_features(cloud, g), KEYS: event_keys(cloud)}
    return Summary(len(cloud), events, {"cell_energy": np.array(cloud.hits[:, 3])}, dict(meta or {}))


def _sep(ref: np.ndarray, gen: np.ndarray, n_bins: int, log: bool = False) -> float:
    edges = binning_from_reference(ref, n_bins, log=log, quantiles=_QUANTILES)
    return separation_power(ref, gen, edges, overflow=True)


def cepc_scores(reference: PointCloudSet, generated: PointCloudSet, g: CEPCGeometry, *,
                n_bins: int = 40) -> dict[str, float]:
    """Separation powers of every feature, their mean, and the collapse diagnostics.

    Bins come from the reference alone (trimmed 0.5-99.5 % range, overflow counted in the
    edge bins), so every trial of a search is scored on the same histograms.
    """
    if len(reference) == 0:
        raise ValueError("cepc_scores needs a non-empty reference sample")
    return scores_from_summaries(summarise(reference, g), summarise(generated, g), n_bins=n_bins)


def scores_from_summaries(reference: Summary, generated: Summary, *, n_bins: int = 40) -> dict[str, float]:
    """:func:`cepc_scores` from the two samples' :func:`summarise` (the streamed path)."""
    if len(reference) == 0:
        raise ValueError("cepc_scores needs a non-empty reference sample")
    ref, gen = reference.events, generated.events
    seps: dict[str, float] = {}
    for name in SCALARS:
        seps[f"sep_{name}"] = _sep(ref[name], gen[name], n_bins)
    for name in PROFILES:
        cols = [_sep(ref[name][:, k], gen[name][:, k], n_bins, log=name == "layer_energy")
                for k in range(ref[name].shape[1]) if np.any(ref[name][:, k] > 0)]
        seps[f"sep_{name}"] = float(np.mean(cols)) if cols else 0.0
    ref_e, gen_e = reference.pooled["cell_energy"], generated.pooled["cell_energy"]
    seps["sep_cell_energy"] = _sep(ref_e, gen_e, n_bins, log=True) if len(ref_e) else 0.0
    scores: dict[str, Any] = {"mean_separation": float(np.mean(list(seps.values()))), **seps}
    scores["duplicate_fraction"] = duplicate_fraction_of_keys(gen[KEYS])
    for tag, f in (("ref", ref), ("gen", gen)):
        scores[f"{tag}_e_ratio_mean"] = float(np.mean(f["e_ratio"]))
        scores[f"{tag}_e_ratio_std"] = float(np.std(f["e_ratio"]))
        scores[f"{tag}_n_cells_mean"] = float(np.mean(f["n_cells"]))
    return {k: float(v) for k, v in scores.items()}


def default_objective() -> tuple[str, str]:
    """The mean separation power over every feature, minimised."""
    return "mean_separation", "min"
