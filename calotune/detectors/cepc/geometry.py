"""CEPC ECAL barrel geometry: readout cells, the cylindrical metric binning, shower axes.

Dimensions from the CEPC group's slides (seed 001): inner radius 1830 mm, outer radius
2130 mm, half length 2900 mm, 28 layers, 32 phi modules, 15 z modules. The barrel is
modelled as a cylinder (the real one is a polygon of flat modules): layer ``l`` spans
radii ``[R_in + l p, R_in + (l + 1) p)`` with pitch ``p = (R_out - R_in) / n_layers``;
readout cells are ``cell_mm`` long in z and ``cell_mm`` wide in r phi at the inner face
(the same phi division in every layer, so cells are projective in phi).

Coordinates: global x, y, z in mm with z along the beam and the interaction point at the
origin, as the seed converts cell positions (Cartesian) to (R, Z, phi). A hit sits at
its cell's centre.

Two segmentations, on purpose:

- readout cells (``cell_mm``): what a hit is (one fired cell), what a model generates;
- the metric binning (``bins_r`` x ``bins_z`` x ``bins_phi`` over the whole barrel): the
  seed's gridding of the detector for metrics, 28 x 15 x 32 by default (one bin per layer
  and per module), finer allowed. The seed found 28 x 15 x 32 too coarse to see shower
  shapes (a shower fits in one or two z/phi bins); its lateral profiles need finer bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from calotune.errors import UserError

__all__ = ["CEPCGeometry", "axis_cells", "cell_centres", "cell_indices", "impact", "metric_bins"]


@dataclass(frozen=True)
class CEPCGeometry:
    """Barrel dimensions, readout cells, material constants and the metric binning."""

    inner_radius_mm: float = 1830.0
    """Inner radius of the barrel (seed 001)."""
    outer_radius_mm: float = 2130.0
    """Outer radius (seed 001): 300 mm of calorimeter."""
    half_length_mm: float = 2900.0
    """Half length along the beam (seed 001)."""
    n_layers: int = 28
    """Sampling layers across the 300 mm (seed 001)."""
    n_phi_modules: int = 32
    """Modules around phi (seed 001); the default ``bins_phi``."""
    n_z_modules: int = 15
    """Modules along z (seed 001); the default ``bins_z``."""
    cell_mm: float = 20.0
    """Readout cell size in z and in r phi at the inner face. The CEPC CDR's Si-W ECAL
    (arXiv 1811.10545) reads 10 mm pads; 20 mm (2 x 2 pads ganged) keeps a 10-50 GeV
    photon at ~100 fired cells, a sequence a transformer on two CPU cores can learn in
    minutes. Finer cells are a geometry override."""
    threshold_mev: float = 5.0
    """Readout threshold on stored (sampling-fraction corrected) energy; ~0.5 MIP in
    0.5 mm of silicon behind 3 mm of tungsten (sampling fraction ~2 %)."""
    x0_mm: float = 12.5
    """Effective radiation length of the layer stack along the radius: 28 layers of 3 mm
    tungsten (X0 = 3.5 mm) make 24 X0 over 300 mm, the CEPC ECAL's depth."""
    moliere_mm: float = 33.0
    """Effective Moliere radius: tungsten's 9.3 mm diluted by the layer pitch over the
    tungsten thickness (10.7 / 3.0); GFlash's radial unit."""
    critical_mev: float = 8.0
    """Critical energy of tungsten (hep-ex/0001020); GFlash's y = E / E_c."""
    z_eff: float = 74.0
    """Atomic number in GFlash's parametrisation (tungsten)."""
    stochastic: float = 0.17
    """Stochastic term a of sigma/E = a / sqrt(E/GeV) of the Si-W ECAL (CEPC CDR: ~17 %);
    applied as per-cell Gamma fluctuations."""
    bins_r: int = 28
    """Metric binning along R (default one bin per layer)."""
    bins_z: int = 15
    """Metric binning along z over the full length (default one per z module)."""
    bins_phi: int = 32
    """Metric binning in phi (default one per phi module)."""
    max_hits: int = 4096
    """Most fired cells one event may hold (``part_sizes`` reports 4 x this); synthesis
    keeps the most energetic ones if a shower ever fires more."""

    def __post_init__(self) -> None:
        """Refuse impossible geometries at construction, naming the field and the value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise UserError(f"cepc-ecal geometry: {f.name} must be an integer >= 1, got {value!r}")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"cepc-ecal geometry: {f.name} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, float(value))  # 30 and 30.0 hash the same
            zero_ok = f.name in ("threshold_mev", "stochastic")
            if value < 0 or (value == 0 and not zero_ok):
                raise UserError(f"cepc-ecal geometry: {f.name} must be {'>= 0' if zero_ok else '> 0'}, "
                                f"got {value!r}")
        if self.outer_radius_mm <= self.inner_radius_mm:
            raise UserError(f"cepc-ecal geometry: outer_radius_mm > inner_radius_mm must hold, but got "
                            f"{self.outer_radius_mm} <= {self.inner_radius_mm}")
        if self.cell_mm > self.layer_mm * 20 or self.n_z_cells < 2 or self.n_phi_cells < 4:
            raise UserError(f"cepc-ecal geometry: cell_mm={self.cell_mm} is too coarse for the barrel")

    @property
    def layer_mm(self) -> float:
        """Radial pitch of one layer (mm)."""
        return (self.outer_radius_mm - self.inner_radius_mm) / self.n_layers

    @property
    def n_z_cells(self) -> int:
        """Readout cells along z."""
        return max(1, round(2 * self.half_length_mm / self.cell_mm))

    @property
    def n_phi_cells(self) -> int:
        """Readout cells around phi (the same in every layer)."""
        return max(1, round(2 * math.pi * self.inner_radius_mm / self.cell_mm))

    @property
    def z_cell_mm(self) -> float:
        """Exact z length of a cell (the length is divided into whole cells)."""
        return 2 * self.half_length_mm / self.n_z_cells

    @property
    def phi_cell_rad(self) -> float:
        """Angular width of a cell."""
        return 2 * math.pi / self.n_phi_cells


def cell_indices(g: CEPCGeometry, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layer, iz, iphi, inside) of points (H, 3) in mm; ``inside`` is False outside the barrel."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    r = np.hypot(xyz[:, 0], xyz[:, 1])
    layer = np.floor((r - g.inner_radius_mm) / g.layer_mm).astype(np.int64)
    iz = np.floor((xyz[:, 2] + g.half_length_mm) / g.z_cell_mm).astype(np.int64)
    phi = np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]), 2 * math.pi)
    iphi = np.minimum(np.floor(phi / g.phi_cell_rad).astype(np.int64), g.n_phi_cells - 1)
    inside = (layer >= 0) & (layer < g.n_layers) & (iz >= 0) & (iz < g.n_z_cells)
    return layer, iz, iphi, inside


def cell_centres(g: CEPCGeometry, layer: np.ndarray, iz: np.ndarray, iphi: np.ndarray) -> np.ndarray:
    """(H, 3) float32 centres (x, y, z) in mm of cells given by index arrays."""
    r = g.inner_radius_mm + (np.asarray(layer) + 0.5) * g.layer_mm
    phi = (np.asarray(iphi) + 0.5) * g.phi_cell_rad
    z = (np.asarray(iz) + 0.5) * g.z_cell_mm - g.half_length_mm
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z]).astype(np.float32)


def impact(g: CEPCGeometry, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phi, z) in (rad, mm) where a straight track from the origin with momentum
    (px, py, pz) crosses the inner face (no magnetic field: photons, or a fast electron)."""
    pt = np.maximum(np.hypot(px, py), 1e-9)
    return np.mod(np.arctan2(py, px), 2 * math.pi), g.inner_radius_mm * np.asarray(pz) / pt


def axis_cells(g: CEPCGeometry, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous cell coordinates (N, n_layers) in z and (N,) in phi of the shower axis at
    each layer's mid radius: where a model puts a shower's cell offsets 0."""
    phi0, _ = impact(g, px, py, pz)
    pt = np.maximum(np.hypot(px, py), 1e-9)
    r_mid = g.inner_radius_mm + (np.arange(g.n_layers) + 0.5) * g.layer_mm
    z = r_mid[None, :] * (np.asarray(pz) / pt)[:, None]
    return (z + g.half_length_mm) / g.z_cell_mm, phi0 / g.phi_cell_rad


def metric_bins(g: CEPCGeometry, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ir, iz, iphi) of points in the cylindrical metric binning (clipped into range)."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    r = np.hypot(xyz[:, 0], xyz[:, 1])
    span = g.outer_radius_mm - g.inner_radius_mm
    ir = np.clip(np.floor((r - g.inner_radius_mm) / span * g.bins_r), 0, g.bins_r - 1).astype(np.int64)
    iz = np.clip(np.floor((xyz[:, 2] + g.half_length_mm) / (2 * g.half_length_mm) * g.bins_z),
                 0, g.bins_z - 1).astype(np.int64)
    phi = np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]), 2 * math.pi)
    iphi = np.clip(np.floor(phi / (2 * math.pi) * g.bins_phi), 0, g.bins_phi - 1).astype(np.int64)
    return ir, iz, iphi
