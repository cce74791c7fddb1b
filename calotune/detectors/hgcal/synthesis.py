"""Parametrised HGCal-like electron showers as point clouds (GFlash, hep-ex/0001020).

Real HGCal simulation is not public, so showers follow GFlash (Grindhammer & Peters,
hep-ex/0001020, through :mod:`calotune.detectors.gflash`): per shower a Gamma longitudinal
profile with correlated fluctuations of its shape, a core + tail radial profile that
widens with depth, exact cell shares of it (no energy-spot sampling), then per-cell Gamma
sampling fluctuations (variance a^2 x 1 GeV x mean, so any sum of cells has the resolution
a / sqrt(E/GeV)) and the readout threshold. Each cell above threshold is one hit at its
centre, so the number of hits grows with energy (more cells reach the threshold in the
wider, longer showers of higher energies) and saturates slowly: the hits-per-event vs
incident-energy relation the thesis's model got wrong (seed 004, section 6.4).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from scipy.special import gammainc

from calotune.detectors import gflash
from calotune.detectors.hgcal.geometry import HGCalGeometry, cell_centres
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet, grid_to_point_cloud
from calotune.showers import ShowerSet

__all__ = ["ENERGY_RANGE_GEV", "synthesize"]

#: Default incident-energy range (GeV), log-uniform: an electron in the endcap.
ENERGY_RANGE_GEV: tuple[float, float] = (1.0, 100.0)
#: Events per vectorised block: (block, layers, nx, ny) float32 arrays of a few MB.
_CHUNK = 512
#: Shower-to-shower spread of the lateral scale (log-normal sigma).
_WIDTH_SPREAD = 0.1


def _digitise(mean: np.ndarray, g: HGCalGeometry, rng: np.random.Generator) -> np.ndarray:
    """Per-cell Gamma sampling fluctuations, then the readout threshold.

    A Gamma of mean m and variance c m, c = a^2 x 1 GeV, gives sums of cells the
    resolution a / sqrt(E/GeV); small means give mostly zeros and rare large hits (the
    sparse, clumpy look of silicon cells). Cells under a tenth of the threshold read 0
    without sampling: they hold a negligible share of the energy.
    """
    out = np.zeros(mean.shape, np.float32)
    if g.stochastic == 0:
        out[...] = mean
    else:
        c = g.stochastic**2 * 1e3
        live = mean > max(0.1 * g.threshold_mev, 1e-9)
        out[live] = rng.standard_gamma((mean[live] / c).astype(np.float32), dtype=np.float32) * c
    out[out < g.threshold_mev] = 0.0
    return out


def _mean_cells(g: HGCalGeometry, e_gev: np.ndarray, x0: np.ndarray, y0: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """(M, n_layers, nx, ny) mean cell energies (MeV) of GFlash electron showers."""
    m = len(e_gev)
    alpha, beta, t_max = gflash.longitudinal(e_gev * 1e3, g.z_eff, g.critical_mev, rng)
    t_edges = np.arange(g.n_layers + 1) * g.layer_x0
    cumulative = gammainc(alpha[:, None], beta[:, None] * t_edges)  # (M, L + 1)
    deposit = 1e3 * e_gev[:, None] * np.diff(cumulative, axis=1)  # (M, L) MeV
    width = np.exp(_WIDTH_SPREAD * rng.standard_normal(m))
    xe, ye = g.x_edges(), g.y_edges()
    out = np.zeros((m, g.n_layers, g.nx, g.ny), np.float32)
    for layer in range(g.n_layers):
        live = np.flatnonzero(deposit[:, layer] > 1e-3 * g.threshold_mev)
        if live.size == 0:
            continue
        tau = (layer + 0.5) * g.layer_x0 / t_max[live]
        r_core, r_tail, p_core = gflash.radial(e_gev[live], tau, g.z_eff)
        scale = g.moliere_mm * width[live]
        p = p_core[:, None, None]
        share = p * gflash.cell_fractions(xe, ye, x0[live], y0[live], r_core * scale)
        share += (1 - p) * gflash.cell_fractions(xe, ye, x0[live], y0[live], r_tail * scale)
        out[live, layer] = deposit[live, layer, None, None] * share
    return out


def synthesize(g: HGCalGeometry, n_events: int, seed: int, *, name: str, version: int,
               **options: Any) -> PointCloudSet:
    """Electron showers, incident energy log-uniform in [``e_min_gev``, ``e_max_gev``]
    (options; default 1-100 GeV), impact points uniform within ``beam_spot_mm`` of the
    axis. Same seed, same showers."""
    e_min, e_max = options.pop("e_min_gev", ENERGY_RANGE_GEV[0]), options.pop("e_max_gev", ENERGY_RANGE_GEV[1])
    if options:
        raise UserError(f"hgcal synthesize: unknown option(s) {sorted(options)}; known: e_min_gev, e_max_gev")
    for key, value in (("e_min_gev", e_min), ("e_max_gev", e_max)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
            raise UserError(f"hgcal synthesize: {key} must be a positive number, got {value!r}")
    if e_min > e_max:
        raise UserError(f"hgcal synthesize: e_min_gev <= e_max_gev must hold, but got ({e_min}, {e_max})")
    if isinstance(n_events, bool) or not isinstance(n_events, numbers.Integral) or n_events < 1:
        raise UserError(f"hgcal synthesize: the number of events must be >= 1, got {n_events!r}")
    rng = np.random.default_rng(seed)
    e_gev = np.exp(rng.uniform(np.log(e_min), np.log(e_max), n_events))
    x0, y0 = rng.uniform(-g.beam_spot_mm, g.beam_spot_mm, (2, n_events)) if g.beam_spot_mm > 0 \
        else np.zeros((2, n_events))
    cells = np.empty((n_events, g.n_cells), np.float32)
    for lo in range(0, n_events, _CHUNK):
        s = slice(lo, lo + _CHUNK)
        mean = _mean_cells(g, e_gev[s], x0[s], y0[s], rng)
        cells[s] = _digitise(mean, g, rng).reshape(len(mean), -1)
    grid = ShowerSet(conditions={"energy": (e_gev * 1e3).astype(np.float32)}, cells={"cells": cells})
    cloud = grid_to_point_cloud(grid, {"cells": cell_centres(g)})
    cloud.attrs = {"detector": name, "particle": "electron", "seed": int(seed),
                   "source": f"calotune parametrised v{version}"}
    return cloud
