"""Files of the regular binning: the CaloChallenge layout, ``incident_energies`` (N, 1) and
``showers`` (N, 2352) in MeV, float64, gzip-compressed, voxels in the order
``showers.reshape(N, 7, n_phi, n_r)``; read and written through :mod:`calotune.data.hdf5`
by the shared CaloChallenge routines."""

from __future__ import annotations

from calotune.detectors.calochallenge.io import CaloChallengeFiles

__all__ = ["AtlasRegularFiles"]


class AtlasRegularFiles(CaloChallengeFiles):
    """File I/O of :class:`~calotune.detectors.atlas_regular.AtlasRegular`; the width message
    names this binning instead of a CaloChallenge dataset."""

    def _width_text(self, width: int) -> str:
        g = self.geometry
        layers, n_alpha, n_r = len(g.layer_ids), g.n_alpha[0], g.binning.layers[0].n_r
        return (f"the ATLAS regular binning ({self.name}) expects {g.n_voxels} voxels per event "
                f"({layers} layers x {n_alpha} phi x {n_r} r); check the detector and its geometry")
