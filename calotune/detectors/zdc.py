"""Zero-degree calorimeter: a crystal ECAL in front of a 36-layer sampling HCAL.

Modelled on the ePIC ZDC that the Academia Sinica ZDC-ML group trains on (seed slides
000): ECAL and HCAL are separate parts because their networks run as parallel paths,
and the HCAL keeps its full (layer, x, y) segmentation because the X-Z development of
neutron showers is what those networks find hardest. Real simulation output is not
public, so :meth:`ZDC.synthesize` builds parametrised showers instead (physics.md §7):
photons follow Grindhammer & Peters (GFlash, hep-ex/0001020), neutrons the hadronic
profile of Bock et al., NIM 186 (1981) 533.

Stored energies are in MeV. HCAL cells hold visible energy divided by the sampling
fraction (the CaloChallenge convention), so ECAL and HCAL add up to the shower energy and
the HCAL/total fraction is meaningful.

File layout (HDF5, one row per event): ``incident_energies`` (N, 1) MeV,
``incident_theta`` (N, 1) rad, ``incident_phi`` (N, 1) rad, ``ecal`` (N, n_ecal) with
flat index ``ix * ecal_ny + iy`` (``reshape(N, nx, ny)``), ``hcal`` (N, n_hcal) with
``reshape(N, nz, nx, ny)`` (layer first, like CaloChallenge); attributes ``detector``,
``particle`` and ``geometry`` (JSON of :class:`ZDCGeometry`), all optional on read.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import gammainc

from calotune.data.hdf5 import (
    StreamWriter,
    atomic_write,
    check_dataset,
    open_checked,
    read_attrs,
    read_dataset,
    require_keys,
)
from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.showers import ShowerSet

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ZDCGeometry:
    """Cell layout and material constants; every field can be overridden by keyword."""

    ecal_nx: int = 20
    """ECAL crystals along x."""
    ecal_ny: int = 20
    """ECAL crystals along y."""
    ecal_cell_mm: float = 30.0
    """Crystal face size (mm); 20 x 30 mm covers the same 60 cm face as the HCAL."""
    ecal_depth_x0: float = 14.0
    """Crystal length in radiation lengths (12.5 cm of PbWO4, 0.6 lambda). A compromise:
    ePIC's 7 cm crystals let most photon energy leak, 22 X0 would take ~30 % of a neutron's;
    14 X0 keeps ~80 % of photon and ~7 % of neutron energy in the ECAL."""
    ecal_x0_mm: float = 8.903
    """ECAL radiation length X0 (mm); PDG value for PbWO4."""
    ecal_moliere_mm: float = 19.59
    """ECAL Moliere radius (mm); PbWO4; the unit of the GFlash radial profile."""
    ecal_lambda_mm: float = 202.8
    """ECAL nuclear interaction length (mm); PbWO4. Where neutrons start showering."""
    ecal_critical_mev: float = 9.64
    """ECAL critical energy E_c (MeV); GFlash's y = E / E_c."""
    ecal_z: float = 68.4
    """Effective atomic number of the crystal, used by the GFlash parametrisation."""
    ecal_stochastic: float = 0.03
    """ECAL stochastic term a in sigma/E = a / sqrt(E/GeV) (photo-statistics)."""
    ecal_threshold_mev: float = 2.0
    """ECAL readout threshold (MeV): crystals below it read 0."""
    hcal_nx: int = 10
    """HCAL towers along x."""
    hcal_ny: int = 10
    """HCAL towers along y."""
    hcal_nz: int = 36
    """HCAL longitudinal layers (10 x 10 x 36 = 3600 cells)."""
    hcal_cell_mm: float = 60.0
    """HCAL tile size (mm)."""
    hcal_layer_mm: float = 30.0
    """Thickness of one layer: 25 mm Fe + 3 mm scintillator + 2 mm readout (mm)."""
    hcal_lambda_mm: float = 196.0
    """Effective interaction length of the Fe/scintillator stack (mm): 36 layers ~ 5.5 lambda."""
    hcal_x0_mm: float = 21.0
    """Effective radiation length of the stack (mm); sets the EM part of hadron showers."""
    hcal_moliere_mm: float = 20.3
    """Effective Moliere radius of the stack (mm); width of the EM core in the HCAL."""
    hcal_sampling_fraction: float = 0.021
    """Visible / deposited energy; stored HCAL energies are already divided by it."""
    hcal_stochastic: float = 0.5
    """HCAL stochastic term a in sigma/E = a / sqrt(E/GeV) (sampling fluctuations)."""
    hcal_threshold_visible_mev: float = 0.3
    """HCAL threshold in visible MeV (~half a MIP in 3 mm of scintillator)."""
    h_over_e: float = 0.75
    """Response to the hadronic part of a shower relative to its EM part (non-compensation):
    couples EM-fraction fluctuations to the measured energy."""
    distance_mm: float = 35800.0
    """Distance from the interaction point to the ECAL face (mm): turns impact points into
    polar angles, so full-coverage theta is a few mrad."""

    def __post_init__(self) -> None:
        """Refuse impossible geometries at construction, naming the field and the value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise UserError(f"zdc geometry: {f.name} must be an integer >= 1, got {value!r}")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UserError(f"zdc geometry: {f.name} must be a number, got {value!r}")
            # stored as float so that geometry_dict() (and cache hashes) do not depend on
            # whether the user wrote 30 or 30.0
            object.__setattr__(self, f.name, float(value))
            zero_ok = f.name.endswith(("threshold_mev", "stochastic"))
            if not np.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                rule = ">= 0" if zero_ok else "> 0"
                raise UserError(f"zdc geometry: {f.name} must be finite and {rule}, got {value!r}")
        if self.hcal_sampling_fraction > 1:
            raise UserError(f"zdc geometry: hcal_sampling_fraction must be <= 1, got {self.hcal_sampling_fraction!r}")

    @property
    def n_ecal(self) -> int:
        """Number of ECAL cells."""
        return self.ecal_nx * self.ecal_ny

    @property
    def n_hcal(self) -> int:
        """Number of HCAL cells."""
        return self.hcal_nz * self.hcal_nx * self.hcal_ny

    @property
    def ecal_depth_mm(self) -> float:
        """Crystal length (mm); the HCAL starts right behind it."""
        return self.ecal_depth_x0 * self.ecal_x0_mm

    @property
    def hcal_threshold_mev(self) -> float:
        """HCAL threshold in stored (sampling-fraction corrected) MeV, for metrics."""
        return self.hcal_threshold_visible_mev / self.hcal_sampling_fraction

    def ecal_x_centres(self) -> np.ndarray:
        """(ecal_nx,) crystal-centre x (mm); the beam axis is x = y = 0."""
        return _centres(self.ecal_nx, self.ecal_cell_mm)

    def ecal_y_centres(self) -> np.ndarray:
        """(ecal_ny,) crystal-centre y (mm)."""
        return _centres(self.ecal_ny, self.ecal_cell_mm)

    def hcal_x_centres(self) -> np.ndarray:
        """(hcal_nx,) tile-centre x (mm)."""
        return _centres(self.hcal_nx, self.hcal_cell_mm)

    def hcal_y_centres(self) -> np.ndarray:
        """(hcal_ny,) tile-centre y (mm)."""
        return _centres(self.hcal_ny, self.hcal_cell_mm)

    def hcal_z_centres(self) -> np.ndarray:
        """(hcal_nz,) layer-centre depth (mm) measured from the ECAL front face."""
        return self.ecal_depth_mm + (np.arange(self.hcal_nz) + 0.5) * self.hcal_layer_mm


def _edges(n: int, cell: float) -> np.ndarray:
    return (np.arange(n + 1) - n / 2) * cell


def _centres(n: int, cell: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * cell


def _grid(g: ZDCGeometry, ecal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (mm) along x and y of the ECAL or the HCAL."""
    if ecal:
        return _edges(g.ecal_nx, g.ecal_cell_mm), _edges(g.ecal_ny, g.ecal_cell_mm)
    return _edges(g.hcal_nx, g.hcal_cell_mm), _edges(g.hcal_ny, g.hcal_cell_mm)


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


def _cell_fractions(
    x_edges: np.ndarray, y_edges: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray
) -> np.ndarray:
    """Share of f(r) = 2 r R^2 / (r^2 + R^2)^2 around (cx, cy) in each cell, (M, nx, ny).

    This is the GFlash radial form (Grindhammer & Peters, hep-ex/0001020). In the plane it
    is R^2 / (pi (r^2 + R^2)^2), whose integral over [0, x] x [0, y] is exactly
    (x/a atan(y/a) + y/b atan(x/b)) / 2 pi with a = sqrt(x^2 + R^2), b = sqrt(y^2 + R^2),
    so cells get exact shares without sampling ~10^4 energy spots per shower.
    """
    # float32 on purpose: numpy's float32 arctan is vectorised and ~20x faster; the
    # rounding (~1e-7 of the shower) only touches cells far below any threshold.
    x = (x_edges[None, :] - cx[:, None]).astype(np.float32)  # (M, nx+1)
    y = (y_edges[None, :] - cy[:, None]).astype(np.float32)  # (M, ny+1)
    r2 = np.square(radius).astype(np.float32)[:, None]
    a, b = np.sqrt(x * x + r2), np.sqrt(y * y + r2)
    corner = (x / a)[:, :, None] * np.arctan(y[:, None, :] / a[:, :, None])
    corner += (y / b)[:, None, :] * np.arctan(x[:, :, None] / b[:, None, :])  # (M, nx+1, ny+1)
    return np.maximum(np.diff(np.diff(corner, axis=1), axis=2) / (2 * np.pi), 0.0)


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
    m, ln_e = len(e_gev), np.log(e_gev)
    ln_y = np.log(e_gev * 1e3 / g.ecal_critical_mev)
    s_t, s_a = 1 / (-1.4 + 1.26 * ln_y), 1 / (-0.58 + 0.86 * ln_y)
    rho = 0.705 - 0.023 * ln_y
    z1, z2 = rng.standard_normal((2, m))
    cp, cm = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    t_max = np.exp(np.log(ln_y - 0.812) + s_t * (cp * z1 + cm * z2))
    alpha = np.exp(np.log(0.81 + (0.458 + 2.26 / g.ecal_z) * ln_y) + s_a * (cp * z1 - cm * z2))
    alpha = np.maximum(alpha, 1.05)
    beta = (alpha - 1) / t_max
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
    z1c, z2c = 0.0251 + 0.00319 * ln_e, 0.1162 - 0.000381 * g.ecal_z
    k1, k4 = 0.659 - 0.00309 * g.ecal_z, 0.3585 + 0.0412 * ln_e
    p1, p2, p3 = 2.632 - 0.00094 * g.ecal_z, 0.401 + 0.00187 * g.ecal_z, 1.313 - 0.0686 * ln_e
    ecal = np.zeros((m, g.ecal_nx, g.ecal_ny), np.float32)
    hcal = np.zeros((m, g.hcal_nz, g.hcal_nx, g.hcal_ny), np.float32)
    for j in range(len(t_mid)):
        in_ecal = j < _ECAL_SLICES
        live = _reached(deposit[:, j], g, in_ecal)
        if live.size == 0:
            continue
        tau = t_mid[j] / t_max[live]
        r_core = (z1c[live] + z2c * tau) * width[live]
        r_tail = k1 * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4[live] * (tau - 0.645))) * width[live]
        u = (p2 - tau) / p3[live]
        p = np.clip(p1 * np.exp(u - np.exp(u)), 0.0, 1.0)[:, None, None]
        xe, ye = _grid(g, in_ecal)
        unit = g.ecal_moliere_mm if in_ecal else g.hcal_moliere_mm
        cx, cy = (x0 + tx * z_mid[j])[live], (y0 + ty * z_mid[j])[live]
        share = p * _cell_fractions(xe, ye, cx, cy, r_core * unit)
        share += (1 - p) * _cell_fractions(xe, ye, cx, cy, r_tail * unit)
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
    m, ln_e = len(e_gev), np.log(e_gev)
    mu = np.clip(1 - e_gev ** (-0.18), 0.05, 0.95)
    f_em = rng.beta(8 * mu, 8 * (1 - mu))
    e_vis = 1e3 * e_gev * (f_em + (1 - f_em) * g.h_over_e)
    a = (0.6165 + 0.3183 * ln_e) * np.exp(0.1 * rng.standard_normal(m))
    d = 0.9099 - 0.0237 * ln_e
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
    em = prompt[:, None] * np.diff(gammainc(a[:, None], 0.2198 * s_x0), axis=1)
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
        share = em[live, j, None, None] * _cell_fractions(xe, ye, cx, cy, r_core)
        share += had[live, j, None, None] * _cell_fractions(xe, ye, cx, cy, r_halo)
        _add(ecal, hcal, j, live, share)
    return ecal, hcal


_SHOWER_MODELS = {"neutron": _neutron_means, "photon": _photon_means}


class ZDC(Detector):
    """The ZDC: ``ZDC(**overrides)`` takes any :class:`ZDCGeometry` field by keyword."""

    name = "zdc"
    conditions = ("energy", "theta", "phi")
    parts = ("ecal", "hcal")
    #: bump when the synthetic parametrisation changes, so cached samples are rebuilt.
    synthesis_version = 1
    #: ShowerSet condition -> HDF5 key.
    condition_keys: dict[str, str] = {  # noqa: RUF012 - read-only class constant
        "energy": "incident_energies",
        "theta": "incident_theta",
        "phi": "incident_phi",
    }

    def __init__(self, **geometry: Any) -> None:
        self.geometry = ZDCGeometry(**geometry)

    def __repr__(self) -> str:
        return f"ZDC({self.geometry})"

    @property
    def part_sizes(self) -> dict[str, int]:
        return {"ecal": self.geometry.n_ecal, "hcal": self.geometry.n_hcal}

    def geometry_dict(self) -> dict[str, Any]:
        return asdict(self.geometry)

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> ZDC:
        unknown = sorted(set(geometry) - {f.name for f in fields(ZDCGeometry)})
        if unknown:
            raise UserError(
                f"zdc geometry: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(f.name for f in fields(ZDCGeometry))}"
            )
        return cls(**geometry)

    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
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
        g, rng = self.geometry, np.random.default_rng(seed)
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
                "detector": self.name,
                "particle": particle,
                "mode": mode,
                "seed": int(seed),
                "source": f"calotune parametrised v{self.synthesis_version}",
            },
        )

    def _geometry_diff(self, path: Path, attrs: dict[str, Any]) -> str:
        """The fields where the file's 'geometry' attribute disagrees with ours, as text."""
        try:
            theirs = json.loads(str(attrs.get("geometry", "{}")))
        except (json.JSONDecodeError, RecursionError):
            log.warning("%s: attribute 'geometry' is not JSON; ignoring it", path)
            return ""
        ours = self.geometry_dict()
        diff = {k: v for k, v in theirs.items() if k in ours and v != ours[k]} if isinstance(theirs, dict) else {}
        return ", ".join(f"{k}={v!r}" for k, v in diff.items())

    def _layouts(self, diff: str) -> dict[str, str]:
        """Width-error wording per part, pointing at the file's own geometry if it differs."""
        g = self.geometry
        hint = f"; the file's 'geometry' attribute has {diff}" if diff else ""
        return {
            "ecal": f"the zdc geometry has {g.n_ecal} ({g.ecal_nx} x {g.ecal_ny}){hint}",
            "hcal": f"the zdc geometry has {g.n_hcal} ({g.hcal_nx} x {g.hcal_ny} x {g.hcal_nz}){hint}",
        }

    def _open_layout(self, f: Any, path: Path) -> tuple[dict[str, Any], dict[str, str], str]:
        """Check keys and the 'detector' attribute of an open file; (attrs, layouts, diff)."""
        require_keys(f, path, [*self.condition_keys.values(), *self.parts], "a zdc file")
        attrs = read_attrs(f, path)
        owner = attrs.get("detector", self.name)
        if owner != self.name:
            raise UserError(
                f"{path}: attribute 'detector' is {owner!r} but this reader is "
                f"for 'zdc'; pass --detector {owner} or the right file"
            )
        diff = self._geometry_diff(path, attrs)
        return attrs, self._layouts(diff), diff

    def _read_conditions(self, f: Any, path: Path, max_events: int | None) -> tuple[dict[str, np.ndarray], dict]:
        """The condition datasets (first ``max_events`` rows) and the row-count check for the rest."""
        one = {"width": 1, "unit": "values", "layout": "it must have 1 (shape (N, 1))"}
        _, (n_declared, _) = check_dataset(f, "incident_energies", path, **one)
        energy = read_dataset(f, "incident_energies", path, strict=True, max_rows=max_events, **one)[:, 0]
        rows = {"n_events": n_declared, "events_key": "incident_energies"}
        conditions = {"energy": energy}
        for cond in ("theta", "phi"):
            key = self.condition_keys[cond]
            conditions[cond] = read_dataset(f, key, path, minimum=None, max_rows=max_events, **one, **rows)[:, 0]
        return conditions, rows

    def read(self, path: Path, max_events: int | None = None) -> ShowerSet:
        """Read and check a zdc file (every check in :mod:`calotune.data.hdf5`).

        ``max_events`` reads only the first N events, so a large file can be sampled
        without loading it whole.
        """
        path = Path(path)
        with open_checked(path) as f:
            attrs, layouts, diff = self._open_layout(f, path)
            conditions, rows = self._read_conditions(f, path, max_events)
            cells = {
                part: read_dataset(
                    f, part, path, width=self.part_sizes[part], layout=layouts[part], max_rows=max_events, **rows
                )
                for part in self.parts
            }
        if diff:
            log.warning(
                "%s: written with another zdc geometry (%s); the cell counts match, so it is read with this one",
                path,
                diff,
            )
        return ShowerSet(conditions=conditions, cells=cells, attrs=attrs)

    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the per-event conditions of a zdc file, after checking its whole layout.

        Generation from a reference's conditions needs no cells; skipping them keeps
        memory at a few bytes per event however large the reference is.
        """
        path = Path(path)
        with open_checked(path) as f:
            _, layouts, _ = self._open_layout(f, path)
            conditions, rows = self._read_conditions(f, path, max_events)
            for part in self.parts:
                check_dataset(f, part, path, width=self.part_sizes[part], layout=layouts[part], **rows)
        return conditions

    def _datasets(self, showers: ShowerSet) -> dict[str, np.ndarray]:
        """The HDF5 datasets of ``showers`` in the documented layout, checked."""
        n = len(showers)
        datasets: dict[str, np.ndarray] = {}
        for cond, key in self.condition_keys.items():
            if cond not in showers.conditions:
                raise ValueError(f"zdc write: ShowerSet lacks condition {cond!r}")
            datasets[key] = np.asarray(showers.conditions[cond], np.float32).reshape(n, 1)
        for part, width in self.part_sizes.items():
            cells = np.asarray(showers.cells.get(part, np.empty((0, 0))), np.float32)
            if cells.shape != (n, width):
                raise ValueError(f"zdc write: part {part!r} has shape {cells.shape}, expected {(n, width)}")
            if not np.isfinite(cells).all() or (cells < 0).any():
                raise ValueError(
                    f"zdc write: part {part!r} has NaN/Inf or negative cells; "
                    "clip generated showers at 0 before writing"
                )
            datasets[part] = cells
        return datasets

    def _file_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {**attrs, "detector": self.name, "geometry": json.dumps(self.geometry_dict(), sort_keys=True)}

    def write(self, path: Path, showers: ShowerSet) -> None:
        """Write ``showers`` atomically (UserError naming the file if the disk refuses)."""
        atomic_write(path, self._datasets(showers), self._file_attrs(showers.attrs))

    def write_stream(self, path: Path, batches: Iterable[ShowerSet], attrs: dict[str, Any] | None = None) -> int:
        """Write showers batch by batch into one file; memory is one batch. Returns the count.

        The file is the same layout :meth:`write` produces and :meth:`read` reads, and
        appears under ``path`` only once every batch is written.
        """
        with StreamWriter(path, self._file_attrs(dict(attrs or {}))) as writer:
            for batch in batches:
                writer.append(self._datasets(batch))
        return writer.rows

    def objectives(self) -> dict[str, str]:
        from calotune.metrics.zdc import ZDC_OBJECTIVES

        return dict(ZDC_OBJECTIVES)

    def scores(self, reference: ShowerSet, generated: ShowerSet) -> dict[str, float]:
        from calotune.metrics.zdc import zdc_scores

        return zdc_scores(reference, generated, self.geometry)

    def plot(self, reference: ShowerSet, generated: ShowerSet, out_dir: Path) -> list[Path]:
        from calotune.metrics.zdc import plot_zdc

        return plot_zdc(reference, generated, self.geometry, Path(out_dir))
