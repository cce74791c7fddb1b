"""HGCal-like geometry: silicon layers behind absorber plates, square cells, point-cloud binning.

Modelled on the electromagnetic section (CE-E) of the CMS High Granularity Calorimeter
(TDR CERN-LHCC-2017-023: 28 silicon sampling layers, ~26 X0 of Pb/CuW/Cu absorber). The
real sensors are hexagonal wafers of hexagonal 0.5 / 1.2 cm^2 cells; calotune uses
**square cells** of the same order of size (15 mm pitch by default, 2.25 cm^2) because a
rectangular grid gives exact GFlash cell shares in closed form
(:func:`calotune.detectors.gflash.cell_fractions`) and a one-line inverse map from a hit
position to its cell (:func:`locate`), which is all a point-cloud model's samples need to
be voxelised and scored. Layers are read out in pairs by default (14 layers of 2 X0) and
cells are about two HGCal cells wide, which keeps a 100 GeV shower at two to four hundred
hits: point clouds a score model can train on with two CPU cores.

Coordinates: x, y transverse, the beam axis at x = y = 0; z the depth from the front
face of the first absorber; all in mm. A hit sits at its cell centre, at the depth of its
layer's centre. Cell order: ``(layer, ix, iy)``, flat index ``(layer * nx + ix) * ny + iy``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from calotune.errors import UserError

__all__ = ["HGCalGeometry", "cell_centres", "locate"]


@dataclass(frozen=True)
class HGCalGeometry:
    """Cell layout, absorber and readout constants; every field can be overridden by keyword."""

    n_layers: int = 14
    """Silicon readout layers (the CE-E's 28 read out in pairs)."""
    nx: int = 12
    """Cells along x."""
    ny: int = 12
    """Cells along y."""
    cell_mm: float = 15.0
    """Square cell pitch (mm): 2.25 cm^2, about two of HGCal's 1.2 cm^2 hexagonal cells."""
    layer_x0: float = 2.0
    """Absorber in front of each readout layer, in radiation lengths (28 X0 in total)."""
    layer_mm: float = 24.0
    """Longitudinal pitch of the layers (mm): absorber, cooling plate, sensors, PCB."""
    moliere_mm: float = 25.0
    """Effective Moliere radius of the sampling stack (mm): the unit of the GFlash radial
    profile; larger than tungsten's 9.3 mm because the gaps and PCBs dilute the absorber."""
    z_eff: float = 74.0
    """Effective atomic number of the absorber (tungsten), for GFlash's fits."""
    critical_mev: float = 8.0
    """Critical energy of the absorber (MeV), tungsten; GFlash's y = E / E_c."""
    stochastic: float = 0.2
    """Sampling term a in sigma/E = a / sqrt(E/GeV) (per-cell Gamma fluctuations; a CE-E
    aims at about 20-25 %)."""
    threshold_mev: float = 8.0
    """Readout threshold in stored (sampling-fraction corrected) MeV: about one MIP of
    300 um silicon (~85 keV) over a ~1 % sampling fraction; cells below it are no hit."""
    beam_spot_mm: float = 5.0
    """Impact points are uniform over a square of this half-width around the axis, so that
    hits do not always sit at the same distance from the shower axis."""

    def __post_init__(self) -> None:
        """Refuse impossible geometries at construction, naming the field and the value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise UserError(f"hgcal geometry: {f.name} must be an integer >= 1, got {value!r}")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UserError(f"hgcal geometry: {f.name} must be a number, got {value!r}")
            # stored as float: geometry_dict() (and cache names) must not depend on 10 vs 10.0
            object.__setattr__(self, f.name, float(value))
            zero_ok = f.name in ("stochastic", "threshold_mev", "beam_spot_mm")
            if not np.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                rule = ">= 0" if zero_ok else "> 0"
                raise UserError(f"hgcal geometry: {f.name} must be finite and {rule}, got {value!r}")

    @property
    def n_cells(self) -> int:
        """Number of cells: the most hits one event can have."""
        return self.n_layers * self.nx * self.ny

    @property
    def depth_mm(self) -> float:
        """Depth of the whole stack (mm)."""
        return self.n_layers * self.layer_mm

    def x_centres(self) -> np.ndarray:
        """(nx,) cell-centre x (mm)."""
        return (np.arange(self.nx) - (self.nx - 1) / 2) * self.cell_mm

    def y_centres(self) -> np.ndarray:
        """(ny,) cell-centre y (mm)."""
        return (np.arange(self.ny) - (self.ny - 1) / 2) * self.cell_mm

    def z_centres(self) -> np.ndarray:
        """(n_layers,) layer-centre depth (mm)."""
        return (np.arange(self.n_layers) + 0.5) * self.layer_mm

    def x_edges(self) -> np.ndarray:
        """(nx + 1,) cell edges along x (mm)."""
        return (np.arange(self.nx + 1) - self.nx / 2) * self.cell_mm

    def y_edges(self) -> np.ndarray:
        """(ny + 1,) cell edges along y (mm)."""
        return (np.arange(self.ny + 1) - self.ny / 2) * self.cell_mm


def cell_centres(g: HGCalGeometry) -> np.ndarray:
    """(n_cells, 3) cell-centre (x, y, z) in mm, in flat cell order ``(layer, ix, iy)``."""
    z, x, y = np.meshgrid(g.z_centres(), g.x_centres(), g.y_centres(), indexing="ij")
    return np.column_stack([x.ravel(), y.ravel(), z.ravel()])


def locate(g: HGCalGeometry, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(0 inside the stack or -1 outside; flat cell index) of points (H, 3) in mm.

    The inverse of :func:`cell_centres`: a point belongs to the cell whose box holds it.
    A point outside the transverse face, in front of the stack or behind it is outside
    (leakage), and a voxelisation drops it.
    """
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    finite = np.isfinite(xyz).all(axis=1)
    xyz = np.clip(np.where(np.isfinite(xyz), xyz, 0.0), -1e12, 1e12)  # no overflowing int casts
    ix = np.floor(xyz[:, 0] / g.cell_mm + g.nx / 2).astype(np.int64)
    iy = np.floor(xyz[:, 1] / g.cell_mm + g.ny / 2).astype(np.int64)
    layer = np.floor(xyz[:, 2] / g.layer_mm).astype(np.int64)
    inside = finite & (ix >= 0) & (ix < g.nx) & (iy >= 0) & (iy < g.ny) & (layer >= 0) & (layer < g.n_layers)
    part = np.where(inside, 0, -1).astype(np.int64)
    cell = np.where(inside, (layer * g.nx + ix) * g.ny + iy, 0).astype(np.int64)
    return part, cell
