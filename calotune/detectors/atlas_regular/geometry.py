"""The ATLAS-like "regular" binning: 7 layers, each 24 radial x 14 angular bins (2352 voxels).

CaloQVAE (seed 003, arXiv 2312.03179 and its follow-ups) re-binned the ATLAS barrel
showers of CaloChallenge dataset 1 (arXiv 2410.21611) onto one regular grid per layer,
z = 7, r = 24, phi = 14, so that every layer has the same shape and a convolutional or
partitioned latent model sees a fixed-size image per layer. The seven layers are the ATLAS
barrel layers of dataset 1 pions: presampler, EMB1-3 and TileBar0-2 (layer ids 0, 1, 2,
3, 12, 13, 14), with the depths of :mod:`calotune.detectors.calochallenge.geometry`.

Radial bins are equal in width out to ``r_max_mm`` (the "equal_bin" choice of the seed)
and angular bins equal over [-pi, pi]; the voxel order is the CaloChallenge one (layer,
then angle, then radius), so the geometry is a :class:`CaloChallengeGeometry` and every
CaloChallenge metric, file routine and point-cloud conversion applies unchanged. The
radial extent is an assumed value: 480 mm keeps the electromagnetic core (Moliere radius
~35 mm in the dataset-1 material) in the first two bins and contains all but ~3 % of the
hadronic halo of the synthetic pions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from calotune.detectors.calochallenge import geometry as cc_geometry
from calotune.detectors.calochallenge.geometry import (
    _DS1_PHOTONS,
    _DS1_PIONS,
    CaloChallengeGeometry,
    _ds1_limits,
)
from calotune.errors import UserError

__all__ = ["LAYER_IDS", "N_LAYERS", "AtlasRegularGeometry", "cell_centres", "locate"]

#: ATLAS barrel layers of CaloChallenge dataset 1 (pions): presampler, EMB1-3, TileBar0-2.
LAYER_IDS: tuple[int, ...] = (0, 1, 2, 3, 12, 13, 14)
#: z of the regular binning: one grid per layer.
N_LAYERS = len(LAYER_IDS)

#: Layer boundaries per particle, in the units the synthesis uses: interaction lengths for
#: pions (dataset 1 pions), radiation lengths for photons (dataset 1 photons up to the end
#: of TileBar0, then TileBar1 and TileBar2 of 4.1 and 1.8 lambda at 12 X0 per lambda, the
#: same assumed ratio as the pion geometry).
_DEPTH_EDGES: dict[str, tuple[float, ...]] = {
    "pion": _DS1_PIONS.depth_edges,
    "photon": (*_DS1_PHOTONS.depth_edges, 40.0 + 4.1 * 12.0, 40.0 + 5.9 * 12.0),
}


@dataclass(frozen=True)
class AtlasRegularGeometry:
    """What defines the regular binning; JSON-round-trippable (:meth:`to_dict`).

    n_r, n_phi: radial and angular bins per layer (24 and 14 in CaloQVAE); r_max_mm: outer
    radial edge; particle: "pion" (all seven layers see the shower) or "photon" (the
    electromagnetic shower ends in TileBar0, so the two back layers stay nearly empty).
    """

    n_r: int = 24
    n_phi: int = 14
    r_max_mm: float = 480.0
    particle: str = "pion"

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.n_r, int) and not isinstance(self.n_r, bool) and self.n_r >= 1):
            problems.append(f"n_r must be an integer >= 1, but got {self.n_r!r}")
        if not (isinstance(self.n_phi, int) and not isinstance(self.n_phi, bool) and self.n_phi >= 1):
            problems.append(f"n_phi must be an integer >= 1, but got {self.n_phi!r}")
        try:
            r_max = float(self.r_max_mm)
        except (TypeError, ValueError):
            r_max = float("nan")
        if not (np.isfinite(r_max) and r_max > 0):
            problems.append(f"r_max_mm must be a positive number, but got {self.r_max_mm!r}")
        if self.particle not in _DEPTH_EDGES:
            problems.append(f"particle must be one of {sorted(_DEPTH_EDGES)}, but got {self.particle!r}")
        if problems:
            raise UserError(f"detector 'atlas-regular': invalid geometry: {'; '.join(problems)}")
        object.__setattr__(self, "r_max_mm", r_max)

    @property
    def n_voxels(self) -> int:
        return N_LAYERS * self.n_r * self.n_phi

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AtlasRegularGeometry:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"atlas-regular geometry: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def calochallenge(self, name: str = "atlas-regular") -> CaloChallengeGeometry:
        """The same binning as a CaloChallenge geometry (the dataset-1 material, energies
        and histogram ranges of the particle), so metrics, I/O and synthesis are shared."""
        base = _DS1_PIONS if self.particle == "pion" else _DS1_PHOTONS
        edges = tuple(float(r) for r in np.linspace(0.0, self.r_max_mm, self.n_r + 1))
        r_edges = (edges,) * N_LAYERS
        return dataclasses.replace(
            base,
            name=name,
            dataset="atlas-regular",
            particle=self.particle,
            layer_ids=LAYER_IDS,
            r_edges_mm=r_edges,
            n_alpha=(self.n_phi,) * N_LAYERS,
            depth_edges=_DEPTH_EDGES[self.particle],
            **_ds1_limits(r_edges, LAYER_IDS),
        )


def cell_centres(geom: CaloChallengeGeometry) -> dict[str, np.ndarray]:
    """{"showers": (n_voxels, 3)} voxel centres (x, y, z) in mm, in file order."""
    return cc_geometry.cell_centres(geom)


def locate(geom: CaloChallengeGeometry, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(0, or -1 outside the grid; flat voxel index) of points (H, 3) in mm."""
    return cc_geometry.locate(geom, xyz)
