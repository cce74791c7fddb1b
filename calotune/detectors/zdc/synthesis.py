"""Parametrised ZDC showers (real ePIC simulation output is not public; GFlash, hep-ex/0001020).

Photons follow GFlash (Grindhammer & Peters, hep-ex/0001020), neutrons the hadronic
profile of Bock et al., NIM 186 (1981) 533, both from :mod:`calotune.detectors.gflash`.
Cells get exact shares of the radial profile (no energy-spot sampling), then per-cell Gamma
sampling fluctuations and the readout threshold (:func:`_digitise`).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from scipy.special import gammainc

from calotune.detectors import gflash
from calotune.detectors.zdc.geometry import ZDCGeometry, _grid
from calotune.errors import UserError
from calotune.showers import ShowerSet

__all__ = ["ENERGY_RANGES_GEV", "synthesize"]

#: Incident-energy ranges (GeV) of the two run types in the ZDC group's studies.
ENERGY_RANGES_GEV: dict[str, tuple[float, float]] = {"full": (1.0, 300.0), "pencil": (50.0, 250.0)}
_ECAL_SLICES = 8  # depth slices per crystal: the radial profile widens with depth
_PENCIL_SPOT_MM = 2.0  # beam-spot sigma of the pencil runs
_FULL_RADIUS = 0.4  # full coverage: impact points in a disc of 0.4 x the face width
_MAX_START_LAMBDA = 2.0  # a "ZDC trigger": the neutron interacts in the first 2 lambda
_PROMPT_EM = 1 / 3  # share of the EM energy made by the first interaction (X0 scale)
_HALO_LAMBDA = 0.15  # median radius of the hadronic halo at its start, in lambda
_WALK_MM = 3.0  # per-slice random walk of a hadronic shower's centroid
_CHUNK = 2048  # events per vectorised block: bounds memory at ~30 MB per array


def _reached(deposit: np.ndarray, g: ZDCGeometry, ecal: bool) -> np.ndarray:
    """Indices of the events with energy worth spreading in this depth slice.

    A slice holding under 1e-3 of the threshold cannot lift any cell above a tenth of
    it (where :func:`_digitise` starts sampling), so it is skipped: this saves much work,
    because most showers have not started yet in the ECAL or have ended in the HCAL.
    """
    threshold = g.ecal_threshold_mev if ecal else g.hcal_threshold_mev
    return np.flatnonzero(deposit > 1e-3 * threshold)


def _add(ecal: np.ndarray, hcal: np.ndarray, j: int, live: np.ndarray, share: np.ndarray) -> None:
    """Add one depth slice's cell energies of the ``live`` events to the right part."""
    if j < _ECAL_SLICES:
        ecal[live] += share
    else:
        hcal[live, j - _ECAL_SLICES] += share



def _digitise(mean: np.ndarray, stochastic: float, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Per-cell Gamma sampling fluctuations, then the readout threshold.

    A Gamma with mean m and variance c m, c = a^2 x 1 GeV, gives every sum of cells the
    resolution a / sqrt(E/GeV); small means give mostly zeros and rare large hits, the
    sparse, clumpy look of real cells. Cells whose mean is under a tenth of the threshold
    read 0 without sampling: they hold < 1 % of the energy but half the sampling time.
    """
    out = np.zeros(mean.shape, np.float32)
    if stochastic == 0:
        out[...] = mean
    else:
        c = stochastic**2 * 1e3
        live = mean > max(0.1 * threshold, 1e-9)
        # float32 Gamma draws are ~2.5x faster than float64 ones
        out[live] = rng.standard_gamma((mean[live] / c).astype(np.float32), dtype=np.float32) * c
    out[out < threshold] = 0.0
    return out


def _photon_means(
    g: ZDCGeometry,
    e_gev: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    tx: np.ndarray,
    ty: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean ECAL (M, nx, ny) and HCAL (M, nz, nx, ny) deposits of GFlash photon showers.

    Grindhammer & Peters (hep-ex/0001020): Gamma longitudinal profile with correlated
    log-normal fluctuations of T and alpha; two-component radial profile that widens with
    tau = t / T. The tail beyond the crystals leaks into the first HCAL layers.
    """
    m = len(e_gev)
    alpha, beta, t_max = gflash.longitudinal(e_gev * 1e3, g.ecal_z, g.ecal_critical_mev, rng)
    layers = np.arange(1, g.hcal_nz + 1)
    t_edges = np.concatenate(
        [np.linspace(0, g.ecal_depth_x0, _ECAL_SLICES + 1), g.ecal_depth_x0 + layers * g.hcal_layer_mm / g.hcal_x0_mm]
    )
    z_edges = np.concatenate(
        [np.linspace(0, g.ecal_depth_mm, _ECAL_SLICES + 1), g.ecal_depth_mm + layers * g.hcal_layer_mm]
    )
    cumulative = gammainc(alpha[:, None], beta[:, None] * t_edges)  # (M, slices+1)
    deposit = (1e3 * e_gev[:, None] * np.diff(cumulative, axis=1)).astype(np.float32)
    t_mid, z_mid = (t_edges[1:] + t_edges[:-1]) / 2, (z_edges[1:] + z_edges[:-1]) / 2
    width = np.exp(0.1 * rng.standard_normal(m))  # shower-to-shower lateral scatter
    ecal = np.zeros((m, g.ecal_nx, g.ecal_ny), np.float32)
    hcal = np.zeros((m, g.hcal_nz, g.hcal_nx, g.hcal_ny), np.float32)
    for j in range(len(t_mid)):
        in_ecal = j < _ECAL_SLICES
        live = _reached(deposit[:, j], g, in_ecal)
        if live.size == 0:
            continue
        tau = t_mid[j] / t_max[live]
        r_core, r_tail, p_core = gflash.radial(e_gev[live], tau, g.ecal_z)
        r_core, r_tail = r_core * width[live], r_tail * width[live]
        p = p_core[:, None, None]
        xe, ye = _grid(g, in_ecal)
        unit = g.ecal_moliere_mm if in_ecal else g.hcal_moliere_mm
        cx, cy = (x0 + tx * z_mid[j])[live], (y0 + ty * z_mid[j])[live]
        share = p * gflash.cell_fractions(xe, ye, cx, cy, r_core * unit)
        share += (1 - p) * gflash.cell_fractions(xe, ye, cx, cy, r_tail * unit)
        _add(ecal, hcal, j, live, deposit[live, j, None, None] * share)
    return ecal, hcal



def _neutron_means(
    g: ZDCGeometry,
    e_gev: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    tx: np.ndarray,
    ty: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean ECAL and HCAL deposits of hadronic neutron showers.

    Longitudinal: Bock et al., NIM 186 (1981) 533, dE/ds ~ w (s/X0)^(a-1) e^(-b s/X0) +
    (1-w) (s/lambda)^(a-1) e^(-d s/lambda), with the EM weight replaced by a per-event
    EM fraction f_em ~ Beta around 1 - (E / 1 GeV)^(-0.18) (the power law of Gabriel et
    al., NIM A 338 (1994) 336): its large event-to-event spread, seen through h/e, is
    what makes hadronic resolution poor. Only the first interaction's share of the EM
    energy (_PROMPT_EM) develops on the X0 scale where the shower starts; later
    generations follow the lambda scale. The start depth is exponential in lambda, so
    about half the showers start in the 0.6 lambda of crystal, yet leave ~93 % of their
    energy in the HCAL. Lateral: a narrow EM core (~Moliere radius) and a hadronic halo ~0.15-0.5 lambda wide
    whose centroid wanders from layer to layer.
    """
    m = len(e_gev)
    mu = np.clip(gflash.em_fraction_mean(e_gev), 0.05, 0.95)
    f_em = rng.beta(8 * mu, 8 * (1 - mu))
    e_vis = 1e3 * e_gev * (f_em + (1 - f_em) * g.h_over_e)
    a, d = gflash.bock_parameters(e_gev)
    a = a * np.exp(0.1 * rng.standard_normal(m))
    layers = np.arange(1, g.hcal_nz + 1)
    ecal_lambda = g.ecal_depth_mm / g.ecal_lambda_mm
    lam_edges = np.concatenate(
        [np.linspace(0, ecal_lambda, _ECAL_SLICES + 1), ecal_lambda + layers * g.hcal_layer_mm / g.hcal_lambda_mm]
    )
    x0_edges = np.concatenate(
        [np.linspace(0, g.ecal_depth_x0, _ECAL_SLICES + 1), g.ecal_depth_x0 + layers * g.hcal_layer_mm / g.hcal_x0_mm]
    )
    z_edges = np.concatenate(
        [np.linspace(0, g.ecal_depth_mm, _ECAL_SLICES + 1), g.ecal_depth_mm + layers * g.hcal_layer_mm]
    )
    d_max = min(_MAX_START_LAMBDA, lam_edges[-1])
    start = -np.log1p(rng.random(m) * np.expm1(-d_max))  # exponential truncated at d_max
    start_x0 = np.interp(start, lam_edges, x0_edges)  # both depths are linear per region
    s_lam = np.maximum(lam_edges[None, :] - start[:, None], 0.0)  # (M, slices+1)
    s_x0 = np.maximum(x0_edges[None, :] - start_x0[:, None], 0.0)
    prompt = _PROMPT_EM * f_em
    em = prompt[:, None] * np.diff(gammainc(a[:, None], gflash.BOCK_B * s_x0), axis=1)
    had = (1 - prompt)[:, None] * np.diff(gammainc(a[:, None], d[:, None] * s_lam), axis=1)
    em, had = (e_vis[:, None] * em).astype(np.float32), (e_vis[:, None] * had).astype(np.float32)
    s_mid = (s_lam[:, 1:] + s_lam[:, :-1]) / 2
    z_mid = (z_edges[1:] + z_edges[:-1]) / 2
    core_w, halo_w = np.exp(0.15 * rng.standard_normal((2, m)))
    walk = np.cumsum(rng.normal(0.0, _WALK_MM, (2, m, len(z_mid))), axis=2)
    ecal = np.zeros((m, g.ecal_nx, g.ecal_ny), np.float32)
    hcal = np.zeros((m, g.hcal_nz, g.hcal_nx, g.hcal_ny), np.float32)
    for j in range(len(z_mid)):
        in_ecal = j < _ECAL_SLICES
        live = _reached(em[:, j] + had[:, j], g, in_ecal)
        if live.size == 0:
            continue
        xe, ye = _grid(g, in_ecal)
        moliere = g.ecal_moliere_mm if in_ecal else g.hcal_moliere_mm
        lam = g.ecal_lambda_mm if in_ecal else g.hcal_lambda_mm
        cx = (x0 + tx * z_mid[j] + walk[0, :, j])[live]
        cy = (y0 + ty * z_mid[j] + walk[1, :, j])[live]
        r_core = moliere * (0.6 + 0.4 * s_mid[live, j]) * core_w[live]
        r_halo = _HALO_LAMBDA * lam * (1 + 0.5 * s_mid[live, j]) * halo_w[live]
        share = em[live, j, None, None] * gflash.cell_fractions(xe, ye, cx, cy, r_core)
        share += had[live, j, None, None] * gflash.cell_fractions(xe, ye, cx, cy, r_halo)
        _add(ecal, hcal, j, live, share)
    return ecal, hcal



_SHOWER_MODELS = {"neutron": _neutron_means, "photon": _photon_means}


def synthesize(g: ZDCGeometry, n_events: int, seed: int, *, name: str, version: int, **options: Any) -> ShowerSet:
    """Parametrised showers; options ``particle`` ("neutron" | "photon") and ``mode``
    ("full": 1-300 GeV over the face, small polar angles; "pencil": 50-250 GeV at the
    face centre). Same seed, same showers."""
    particle, mode = options.pop("particle", "neutron"), options.pop("mode", "full")
    if options:
        raise UserError(f"zdc synthesize: unknown option(s) {sorted(options)}; known: particle, mode")
    if particle not in _SHOWER_MODELS:
        raise UserError(f"zdc synthesize: particle must be one of {sorted(_SHOWER_MODELS)}, got {particle!r}")
    if mode not in ENERGY_RANGES_GEV:
        raise UserError(f"zdc synthesize: mode must be one of {sorted(ENERGY_RANGES_GEV)}, got {mode!r}")
    if isinstance(n_events, bool) or not isinstance(n_events, numbers.Integral) or n_events < 1:
        raise UserError(f"zdc synthesize: the number of events must be >= 1, got {n_events!r}")
    rng = np.random.default_rng(seed)
    e_gev = rng.uniform(*ENERGY_RANGES_GEV[mode], n_events)
    if mode == "pencil":
        x0, y0 = rng.normal(0.0, _PENCIL_SPOT_MM, (2, n_events))
    else:
        r_max = _FULL_RADIUS * min(
            g.ecal_nx * g.ecal_cell_mm,
            g.ecal_ny * g.ecal_cell_mm,
            g.hcal_nx * g.hcal_cell_mm,
            g.hcal_ny * g.hcal_cell_mm,
        )
        r = r_max * np.sqrt(rng.random(n_events))  # uniform over the disc
        azimuth = rng.uniform(-np.pi, np.pi, n_events)
        x0, y0 = r * np.cos(azimuth), r * np.sin(azimuth)
    tx, ty = x0 / g.distance_mm, y0 / g.distance_mm  # the particle comes from the IP
    ecal = np.empty((n_events, g.n_ecal), np.float32)
    hcal = np.empty((n_events, g.n_hcal), np.float32)
    model = _SHOWER_MODELS[particle]
    for lo in range(0, n_events, _CHUNK):
        s = slice(lo, lo + _CHUNK)
        e_mean, h_mean = model(g, e_gev[s], x0[s], y0[s], tx[s], ty[s], rng)
        ecal[s] = _digitise(e_mean, g.ecal_stochastic, g.ecal_threshold_mev, rng).reshape(len(e_mean), -1)
        hcal[s] = _digitise(h_mean, g.hcal_stochastic, g.hcal_threshold_mev, rng).reshape(len(h_mean), -1)
    return ShowerSet(
        conditions={
            "energy": (e_gev * 1e3).astype(np.float32),
            "theta": np.arctan(np.hypot(tx, ty)).astype(np.float32),
            "phi": np.arctan2(y0, x0).astype(np.float32),
        },
        cells={"ecal": ecal, "hcal": hcal},
        attrs={
            "detector": name,
            "particle": particle,
            "mode": mode,
            "seed": int(seed),
            "source": f"calotune parametrised v{version}",
        },
    )
