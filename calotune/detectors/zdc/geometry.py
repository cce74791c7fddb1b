"""ZDC geometry: cell layout and material constants, and the cell centres of point clouds.

Modelled on the ePIC ZDC (a PbWO4 crystal ECAL in front of a 36-layer Fe/scintillator
HCAL; see :mod:`calotune.detectors.zdc`). Coordinates: x, y transverse with the beam axis
at x = y = 0; z the depth from the ECAL front face; all in mm.
Cell order: ECAL ``reshape(N, nx, ny)``, HCAL ``reshape(N, nz, nx, ny)`` (layer first).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from calotune.errors import UserError

__all__ = ["ZDCGeometry", "cell_centres", "locate"]


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


def cell_centres(g: ZDCGeometry) -> dict[str, np.ndarray]:
    """part -> (n_cells, 3) cell-centre (x, y, z) in mm, in file order.

    An ECAL crystal's hit sits at half the crystal depth; an HCAL cell's at its layer's
    centre. Used by :meth:`ZDC.to_point_cloud`; :func:`locate` maps each centre back to
    its own cell.
    """
    ex, ey = np.meshgrid(g.ecal_x_centres(), g.ecal_y_centres(), indexing="ij")
    ecal = np.column_stack([ex.ravel(), ey.ravel(), np.full(g.n_ecal, g.ecal_depth_mm / 2)])
    hz, hx, hy = np.meshgrid(g.hcal_z_centres(), g.hcal_x_centres(), g.hcal_y_centres(), indexing="ij")
    hcal = np.column_stack([hx.ravel(), hy.ravel(), hz.ravel()])
    return {"ecal": ecal, "hcal": hcal}


def _bin(values: np.ndarray, n: int, cell: float) -> np.ndarray:
    """Cell index along one transverse axis (centred grid of n cells), -1 outside."""
    index = np.floor((values - _edges(n, cell)[0]) / cell).astype(np.int64)
    return np.where((index >= 0) & (index < n), index, -1)


def locate(g: ZDCGeometry, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part position: 0 ECAL, 1 HCAL, -1 outside; flat cell index) of points (H, 3) in mm.

    Depth decides the part: [0, ECAL depth) is the ECAL, then one HCAL layer per
    ``hcal_layer_mm``; a point outside the transverse face or behind the last layer is
    outside (leakage).
    """
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    part = np.full(len(xyz), -1, np.int64)
    cell = np.zeros(len(xyz), np.int64)
    in_ecal = (z >= 0) & (z < g.ecal_depth_mm)
    ix, iy = _bin(x, g.ecal_nx, g.ecal_cell_mm), _bin(y, g.ecal_ny, g.ecal_cell_mm)
    ok = in_ecal & (ix >= 0) & (iy >= 0)
    part[ok], cell[ok] = 0, (ix * g.ecal_ny + iy)[ok]
    layer = np.floor((z - g.ecal_depth_mm) / g.hcal_layer_mm).astype(np.int64)
    ix, iy = _bin(x, g.hcal_nx, g.hcal_cell_mm), _bin(y, g.hcal_ny, g.hcal_cell_mm)
    ok = ~in_ecal & (layer >= 0) & (layer < g.hcal_nz) & (ix >= 0) & (iy >= 0)
    part[ok], cell[ok] = 1, ((layer * g.hcal_nx + ix) * g.hcal_ny + iy)[ok]
    return part, cell
