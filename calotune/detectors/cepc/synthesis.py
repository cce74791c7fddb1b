"""Parametrised CEPC ECAL showers: GFlash energy spots in a homogenised Si-W stack.

Real CEPC simulation output is not public, so photons and electrons are built from the
GFlash parametrisation (Grindhammer & Peters, hep-ex/0001020;
shared code in :mod:`calotune.detectors.gflash`):

- a particle with four-momentum (E, px, py, pz), massless, from the interaction point in
  a straight line (no magnetic field), hits the inner face at the impact point;
- its shower develops along the momentum direction: per-shower Gamma longitudinal profile
  in t = depth / X0 with correlated fluctuations of T and alpha; photons first convert
  after an Exp(9/7 X0) path (Bethe-Heitler mean free path, PDG);
- energy spots (``SPOTS`` per shower) are drawn from that profile and GFlash's two-component
  radial profile (core and tail, widening with tau = t / T), at uniform azimuth around the
  axis, in Moliere radii of the stack;
- spots are summed into readout cells (the layer from the radius, z and phi cells), then
  each cell gets Gamma sampling fluctuations that give a sum of cells the resolution
  a / sqrt(E/GeV), and cells below the readout threshold read 0.

Stored energies are corrected for the sampling fraction (the CaloChallenge convention),
so a contained shower's cells add up to about the incident energy.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from calotune.detectors import gflash
from calotune.detectors.cepc.geometry import CEPCGeometry, cell_centres, cell_indices
from calotune.errors import UserError
from calotune.pointclouds import PointCloudSet

__all__ = ["ENERGY_RANGE_GEV", "PARTICLES", "SPOTS", "synthesize"]

#: Default incident-energy range (GeV): the seed's example photon has 39.5 GeV.
ENERGY_RANGE_GEV = (10.0, 50.0)
#: Pseudorapidity range of the directions: the shower stays inside the barrel's length.
ETA_MAX = 0.8
#: Energy spots per shower: many, so that the cell means are smooth and the Gamma
#: digitisation (not the spot count) sets the fluctuations.
SPOTS = 3000
#: Mean free path of a photon before conversion, in X0 (9/7, Bethe-Heitler).
PHOTON_PATH_X0 = 9.0 / 7.0
#: Largest radial draw u of r = R sqrt(u / (1 - u)): ~30 R, beyond it the profile is negligible.
_U_MAX = 0.999
PARTICLES = ("photon", "electron")
_CHUNK = 256


def _digitise(mean: np.ndarray, g: CEPCGeometry, rng: np.random.Generator) -> np.ndarray:
    """Gamma fluctuations with variance c * mean (c = a^2 x 1 GeV), then the threshold."""
    out = mean.astype(np.float32)
    if g.stochastic > 0:
        c = g.stochastic**2 * 1e3
        live = mean > 0
        out[live] = rng.standard_gamma(mean[live] / c).astype(np.float32) * c
    out[out < g.threshold_mev] = 0.0
    return out


def _showers(g: CEPCGeometry, e_gev: np.ndarray, direction: np.ndarray, particle: str,
             rng: np.random.Generator) -> list[np.ndarray]:
    """(n_i, 4) hits [x, y, z, E] per event, cells sorted by decreasing energy."""
    n = len(e_gev)
    alpha, beta, t_max = gflash.longitudinal(e_gev * 1e3, g.z_eff, g.critical_mev, rng)
    start = rng.exponential(PHOTON_PATH_X0, n) if particle == "photon" else np.zeros(n)
    t = start[:, None] + rng.gamma(alpha[:, None], 1.0 / beta[:, None], (n, SPOTS))  # (n, S) X0
    tau = (t - start[:, None]) / t_max[:, None]
    r_core, r_tail, p_core = gflash.radial(np.repeat(e_gev[:, None], SPOTS, 1), tau, g.z_eff)
    radius = np.where(rng.random((n, SPOTS)) < p_core, r_core, r_tail)
    u = rng.random((n, SPOTS)) * _U_MAX
    r = radius * np.sqrt(u / (1 - u)) * g.moliere_mm  # (n, S) mm
    psi = rng.uniform(0, 2 * math.pi, (n, SPOTS))
    nx, ny, _ = direction.T
    n_perp = np.maximum(np.hypot(nx, ny), 1e-9)
    e1 = np.stack([-ny / n_perp, nx / n_perp, np.zeros(n)], axis=1)  # along phi
    e2 = np.cross(direction, e1)
    entry = direction * (g.inner_radius_mm / n_perp)[:, None]  # (n, 3) on the inner face
    xyz = (entry[:, None, :] + direction[:, None, :] * (t * g.x0_mm)[..., None]
           + (r * np.cos(psi))[..., None] * e1[:, None, :] + (r * np.sin(psi))[..., None] * e2[:, None, :])
    layer, iz, iphi, inside = cell_indices(g, xyz.reshape(-1, 3))
    event = np.repeat(np.arange(n), SPOTS)[inside]
    key = ((event * g.n_layers + layer[inside]) * g.n_z_cells + iz[inside]) * g.n_phi_cells + iphi[inside]
    cells, where = np.unique(key, return_inverse=True)
    spot_e = np.repeat(e_gev * 1e3 / SPOTS, SPOTS)[inside]
    mean = np.bincount(where, weights=spot_e, minlength=len(cells))
    energy = _digitise(mean, g, rng)
    keep = energy > 0
    cells, energy = cells[keep], energy[keep]
    iphi_c = cells % g.n_phi_cells
    iz_c = (cells // g.n_phi_cells) % g.n_z_cells
    layer_c = (cells // (g.n_phi_cells * g.n_z_cells)) % g.n_layers
    ev = cells // (g.n_phi_cells * g.n_z_cells * g.n_layers)
    hits = np.column_stack([cell_centres(g, layer_c, iz_c, iphi_c), energy])
    order = np.lexsort((-energy, ev))  # by event, then decreasing energy
    hits, ev = hits[order], ev[order]
    bounds = np.searchsorted(ev, np.arange(n + 1))
    return [hits[bounds[i]:bounds[i + 1]][: g.max_hits] for i in range(n)]


def synthesize(g: CEPCGeometry, n_events: int, seed: int, *, name: str, version: int,
               **options: Any) -> PointCloudSet:
    """Parametrised showers as fired-cell lists; options ``particle`` ("photon" |
    "electron"), ``e_min_gev`` and ``e_max_gev`` (uniform energies) and ``eta_max``. Same seed, same
    showers. Conditions: energy, px, py, pz in MeV (massless, uniform in phi and eta)."""
    particle = options.pop("particle", "photon")
    low = options.pop("e_min_gev", ENERGY_RANGE_GEV[0])
    high = options.pop("e_max_gev", ENERGY_RANGE_GEV[1])
    eta_max = float(options.pop("eta_max", ETA_MAX))
    if options:
        raise UserError(f"cepc-ecal synthesize: unknown option(s) {sorted(options)}; "
                        "known: particle, e_min_gev, e_max_gev, eta_max")
    if particle not in PARTICLES:
        raise UserError(f"cepc-ecal synthesize: particle must be one of {PARTICLES}, got {particle!r}")
    if not 0 < float(low) <= float(high):
        raise UserError(f"cepc-ecal synthesize: 0 < e_min_gev <= e_max_gev must hold, got {low}, {high}")
    if not 0 <= eta_max <= 3:
        raise UserError(f"cepc-ecal synthesize: eta_max must be in [0, 3], got {eta_max}")
    if isinstance(n_events, bool) or not isinstance(n_events, numbers.Integral) or n_events < 1:
        raise UserError(f"cepc-ecal synthesize: the number of events must be >= 1, got {n_events!r}")
    rng = np.random.default_rng(seed)
    e_gev = rng.uniform(float(low), float(high), n_events)
    eta = rng.uniform(-eta_max, eta_max, n_events)
    phi = rng.uniform(0, 2 * math.pi, n_events)
    theta = 2 * np.arctan(np.exp(-eta))
    direction = np.column_stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    events: list[np.ndarray] = []
    for lo in range(0, n_events, _CHUNK):
        s = slice(lo, lo + _CHUNK)
        events += _showers(g, e_gev[s], direction[s], particle, rng)
    e_mev = e_gev * 1e3
    conditions = {"energy": e_mev.astype(np.float32)}
    for k, name_ in enumerate(("px", "py", "pz")):
        conditions[name_] = (e_mev * direction[:, k]).astype(np.float32)
    return PointCloudSet.from_events(conditions, events, attrs={
        "detector": name, "particle": particle, "seed": int(seed),
        "source": f"calotune parametrised v{version}"})
