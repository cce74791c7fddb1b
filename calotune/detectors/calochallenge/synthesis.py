"""Synthetic CaloChallenge showers from the GFlash parametrisation (no Geant4 at hand).

GFlash (Grindhammer & Peters, hep-ex/0001020; :mod:`calotune.detectors.gflash`): a Gamma
longitudinal profile with correlated fluctuations of T and alpha, the two-component
(core + tail) radial profile, and energy-spot sampling fluctuations; photons convert after
Exp(9/7 X0) (Bethe-Heitler, PDG) behind ~2 X0 of upstream dead material (ds1, ATLAS
material maps arXiv 1407.5063), so the whole profile moves with a per-shower start depth;
pions get a simple hadronic model (first interaction depth ~ Exp(lambda), fluctuating
electromagnetic fraction made of pi0 sub-showers of the mean pi0 energy, Bock et al.
longitudinal shape for the hadronic part, a minimum-ionising track before the first
interaction); electromagnetic showers also send ~1 % of their energy back to the layers
in front of the maximum (albedo). The common start depth, the albedo and the shared energy
budget are what correlate the layer energies (within 0.08-0.14 of Geant4's, arXiv
2410.21611; ``benchmarks/synthetic_correlations.py``). Physically shaped stand-ins that
exercise every metric; not Geant4 and not ATLAS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import gammainc

from calotune.detectors import gflash
from calotune.detectors.calochallenge.geometry import CaloChallengeGeometry
from calotune.errors import UserError
from calotune.showers import ShowerSet

__all__ = ["synthesize"]

logger = logging.getLogger("calotune.detectors.calochallenge")


def _longitudinal(energy: np.ndarray, z: float, critical: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """GFlash (alpha, beta) per shower (:func:`calotune.detectors.gflash.longitudinal`)."""
    alpha, beta, _ = gflash.longitudinal(energy, z, critical, rng)
    return alpha, beta


# ============================================================================ synthesis
# GFlash (Grindhammer & Peters, hep-ex/0001020). Energies in MeV unless
# a name says GeV; longitudinal depth t in X0; radii in Moliere radii unless "_mm".

#: energy spots per GeV in a sampling calorimeter: 10.3 / 0.11 (E/GeV)^0.959.
_SPOTS_PER_GEV = 10.3 / 0.11
#: relative spread of one spot's visible energy; exponential spots (1.0) give a
#: stochastic term sqrt((1 + 1) / 93.6) = 14.6 % / sqrt(E/GeV), inside the typical 10-20 %.
_SPOT_SPREAD = 1.0


def _deposit(rng: np.random.Generator, mean: np.ndarray, spot: np.ndarray) -> np.ndarray:
    """Voxel energies with spot-sampling fluctuations, mean ``mean`` (n, ...).

    A voxel collects Poisson(mu / e) spots of exponentially distributed energy (mean e);
    that compound Poisson is replaced by the Gamma law with the same mean and variance
    (mu, mu e (1 + s^2)), one draw per voxel instead of one per spot, which keeps a 10k
    event ds2 sample to seconds. Small means give mostly tiny values that the readout
    threshold removes, i.e. realistic sparsity.
    """
    scale = (spot * (1.0 + _SPOT_SPREAD**2)).reshape((-1,) + (1,) * (mean.ndim - 1))
    shape = (mean / scale).astype(np.float32)
    return rng.standard_gamma(shape, dtype=np.float32) * scale.astype(np.float32)


def _layer_centres(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges)
    return 0.5 * (e[:-1] + e[1:])


#: mean free path of a high-energy photon before pair conversion, 9/7 X0 (Bethe-Heitler
#: limit; PDG Review "Passage of particles through matter", eq. 34.31, and Rossi 1952).
_PHOTON_CONVERSION_X0 = 9.0 / 7.0


#: backward-going soft photons of an electromagnetic shower (albedo): fraction of the
#: shower energy deposited in front of the shower maximum by them, and their attenuation
#: length in X0 (MeV photons in tungsten: mu ~ 1.3 / cm, i.e. ~2.3 X0; NIST XCOM). The
#: fraction is an assumed order of magnitude (albedo of high-Z electromagnetic showers is
#: about 1 %, Fabjan & Gianotti, Rev. Mod. Phys. 75 (2003) 1243).
_ALBEDO_FRACTION = 0.01
_ALBEDO_LENGTH_X0 = 2.3


def _with_albedo(fractions: np.ndarray, depth: np.ndarray, t_peak: np.ndarray) -> np.ndarray:
    """Layer fractions with the albedo added in front of the shower maximum.

    GFlash's Gamma profile (hep-ex/0001020) rises as t^(alpha - 1) and leaves almost
    nothing in the first X0 of a TeV shower, so the front layers would not scale with the
    shower energy; in Geant4 soft photons scattered back from the core do deposit there,
    in proportion to the energy (which is what correlates layer 0 with the rest). The
    density falls as exp(-(t_peak - t) / L) in front of the maximum; the total is kept.
    """
    lo = np.minimum(depth[None, :-1], t_peak[:, None])
    hi = np.minimum(depth[None, 1:], t_peak[:, None])
    length = _ALBEDO_LENGTH_X0
    weight = length * (np.exp(-(t_peak[:, None] - hi) / length)
                       - np.exp(-(t_peak[:, None] - lo) / length))
    norm = length * (1.0 - np.exp(-np.clip(t_peak, 0.0, None) / length))
    albedo = weight / np.maximum(norm, 1e-12)[:, None]
    return (1.0 - _ALBEDO_FRACTION) * fractions + _ALBEDO_FRACTION * albedo


def _synthesize_em(geom: CaloChallengeGeometry, energy: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Electromagnetic showers: GFlash profiles (hep-ex/0001020) behind a fluctuating
    start. A photon travels Exp(9/7 X0) before it converts, and the whole profile moves
    with that depth; this common shift is what correlates the layer energies in Geant4
    (a late start takes energy from the front layers and gives it to the back ones).
    With ``upstream_x0`` of dead material the conversion depth is measured from its
    front: a shower that starts there deposits its first part unseen, so the first
    layer samples an already developing shower, as an ATLAS presampler does."""
    n = len(energy)
    e_gev = energy / 1e3
    alpha, beta = _longitudinal(energy, geom.z_eff, geom.critical_energy_mev, rng)
    depth = np.asarray(geom.depth_edges)
    start = (rng.exponential(_PHOTON_CONVERSION_X0, n) - geom.upstream_x0
             if geom.particle == "photon" else np.zeros(n))
    t_edges = np.clip(depth[None, :] - start[:, None], 0.0, None)
    fractions = np.diff(gammainc(alpha[:, None], beta[:, None] * t_edges), axis=1)
    t_max = (alpha - 1.0) / beta
    fractions = _with_albedo(fractions, depth, start + t_max)
    spot = energy / (_SPOTS_PER_GEV * e_gev**0.959)
    out = np.zeros((n, geom.n_voxels), dtype=np.float32)
    for i, (layer, t_mid) in enumerate(zip(geom.binning.layers, _layer_centres(depth),
                                           strict=True)):
        tau = np.clip(t_mid - start, 0.0, None) / t_max
        r_core, r_tail, p = gflash.radial(e_gev, tau, geom.z_eff)
        q = gflash.radial_fractions(np.asarray(layer.r_edges) / geom.moliere_radius_mm,
                              (r_core, r_tail), (p, 1.0 - p))
        mean = (energy * fractions[:, i])[:, None, None] * q[:, None, :] / layer.n_alpha
        mean = np.broadcast_to(mean, (n, layer.n_alpha, layer.n_r))
        out[:, geom.binning.layer_slice(i)] = _deposit(rng, mean, spot).reshape(n, -1)
    return out


#: pion model constants: MIP loss per interaction length (visible, MeV), h/e response,
#: concentration of the Beta law of the electromagnetic fraction, hadronic lateral
#: core/halo radii (mm) and core weight, hadronic spots per GeV (fewer -> larger
#: fluctuations than electromagnetic showers).
_MIP_MEV_PER_LAMBDA = 150.0
_H_OVER_E = 0.65
_FEM_CONCENTRATION = 6.0
_HAD_RADII_MM = (40.0, 150.0)
_HAD_CORE_WEIGHT = 0.7
_HAD_SPOTS_PER_GEV = 20.0
#: mean number of pi0 per sqrt(E / GeV) of the first hadronic interaction (rounded, assumed)
_PI0_PER_SQRT_GEV = 1.0


def _synthesize_hadronic(geom: CaloChallengeGeometry, energy: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
    """Charged-pion showers: a MIP track to the first interaction at depth ~ Exp(lambda),
    then an electromagnetic part (fraction f_em ~ Beta around Groom's 1 - (E/GeV)^-0.18,
    GFlash in X0 from the interaction point, with the depth profile of one pi0 sub-shower
    of energy f_em E / n_pi0, n_pi0 ~ sqrt(E/GeV)) and a hadronic part (Bock et al.: Gamma
    profile in lambda with a = 0.6165 + 0.3183 ln E, d = 0.9099 - 0.0237 ln E, E in GeV;
    GFlash, hep-ex/0001020; parameters to be verified) seen with response h/e."""
    n = len(energy)
    e_gev = energy / 1e3
    depth = np.asarray(geom.depth_edges)  # lambda
    s0 = rng.exponential(1.0, n)
    lo, hi = depth[:-1][None, :], depth[1:][None, :]
    track = np.clip(np.minimum(s0[:, None], hi) - lo, 0.0, None)
    mip = _MIP_MEV_PER_LAMBDA * track
    cap = np.minimum(1.0, 0.3 * energy / np.maximum(mip.sum(axis=1), 1e-12))
    mip *= cap[:, None]
    e_shower = energy - mip.sum(axis=1)
    mean_fem = np.clip(gflash.em_fraction_mean(e_gev), 0.05, 0.9)
    f_em = rng.beta(mean_fem * _FEM_CONCENTRATION, (1 - mean_fem) * _FEM_CONCENTRATION)
    e_em = f_em * e_shower
    e_had = (1.0 - f_em) * e_shower * _H_OVER_E

    # The electromagnetic part is many pi0 photon showers, each of a small share of e_em:
    # its depth profile is that of a shower of the mean pi0 energy (the pi0 multiplicity
    # grows roughly as sqrt(E), Wigmans, "Calorimetry", ch. 2), which starts and peaks
    # far earlier than one shower of energy e_em would.
    n_pi0 = np.maximum(1.0, _PI0_PER_SQRT_GEV * np.sqrt(np.maximum(e_gev, 0.0)))
    alpha, beta = _longitudinal(np.maximum(e_em / n_pi0, 1.0), geom.z_eff,
                                       geom.critical_energy_mev, rng)
    t_edges = np.clip(depth[None, :] - s0[:, None], 0.0, None) * geom.x0_per_lambda
    frac_em = np.diff(gammainc(alpha[:, None], beta[:, None] * t_edges), axis=1)
    t_max = (alpha - 1.0) / beta
    a_had, d_had = gflash.bock_parameters(e_gev)
    s_edges = np.clip(depth[None, :] - s0[:, None], 0.0, None)
    frac_had = np.diff(gammainc(a_had[:, None], d_had[:, None] * s_edges), axis=1)

    spot_em = np.maximum(e_em, 1e-3) / np.maximum(
        _SPOTS_PER_GEV * np.maximum(e_em / 1e3, 1e-6) ** 0.959, 1.0)
    spot_had = np.maximum(e_had, 1e-3) / np.maximum(_HAD_SPOTS_PER_GEV * e_had / 1e3, 1.0)
    out = np.zeros((n, geom.n_voxels), dtype=np.float32)
    centres = _layer_centres(depth)
    for i, layer in enumerate(geom.binning.layers):
        shape = (n, layer.n_alpha, layer.n_r)
        t_mid = np.clip(centres[i] - s0, 0.0, None) * geom.x0_per_lambda
        r_core, r_tail, p = gflash.radial(np.maximum(e_em / 1e3, 1e-3), t_mid / t_max,
                                           geom.z_eff)
        edges_rm = np.asarray(layer.r_edges) / geom.moliere_radius_mm
        q_em = gflash.radial_fractions(edges_rm, (r_core, r_tail), (p, 1.0 - p))
        ones = np.ones(n)
        q_had = gflash.radial_fractions(
            np.asarray(layer.r_edges),
            (_HAD_RADII_MM[0] * ones, _HAD_RADII_MM[1] * ones),
            (_HAD_CORE_WEIGHT * ones, (1.0 - _HAD_CORE_WEIGHT) * ones),
        )
        mean_em = (e_em * frac_em[:, i])[:, None, None] * q_em[:, None, :] / layer.n_alpha
        mean_had = (e_had * frac_had[:, i])[:, None, None] * q_had[:, None, :] / layer.n_alpha
        block = (_deposit(rng, np.broadcast_to(mean_em, shape), spot_em)
                 + _deposit(rng, np.broadcast_to(mean_had, shape), spot_had))
        # The track crosses the innermost radial bin of one angular bin; Landau-like
        # fluctuation approximated by a Gamma(4) law.
        hit_alpha = rng.integers(0, layer.n_alpha, n)
        block[np.arange(n), hit_alpha, 0] += (
            mip[:, i] * rng.standard_gamma(4.0, n) / 4.0).astype(np.float32)
        out[:, geom.binning.layer_slice(i)] = block.reshape(n, -1)
    return out



def synthesize(geom: CaloChallengeGeometry, n_events: int, seed: int, *, name: str, **options: Any) -> ShowerSet:
    """Synthetic reference showers (module docstring); options: ``energies`` (MeV).

    Energies default to the dataset's distribution: the 15 discrete values
    2^8 .. 2^22 MeV for ds1, log-uniform 1 GeV .. 1 TeV for ds2/ds3. The readout
    threshold is applied, as a real detector would.
    """
    unknown = sorted(set(options) - {"energies"})
    if unknown:
        raise UserError(f"{name}.synthesize: unknown options {unknown}; "
                        "known: ['energies']")
    if n_events < 1:
        raise UserError(f"{name}.synthesize: n_events must be >= 1, got {n_events}")
    g = geom
    rng = np.random.default_rng(seed)
    if options.get("energies") is not None:
        energy = np.asarray(options["energies"], dtype=np.float64).reshape(-1)
        if len(energy) != n_events or not np.all(energy > 0):
            raise UserError(f"{name}.synthesize: 'energies' must hold {n_events} "
                            "positive values (MeV)")
    elif g.discrete_energies_mev:
        energy = rng.choice(np.asarray(g.discrete_energies_mev), size=n_events)
    else:
        energy = np.exp(rng.uniform(np.log(g.energy_min_mev), np.log(g.energy_max_mev),
                                    n_events))
    if g.particle == "pion":
        showers = _synthesize_hadronic(g, energy, rng)
    else:
        showers = _synthesize_em(g, energy, rng)
    showers[showers < g.threshold_mev] = 0.0
    logger.debug("%s: synthesised %d showers (seed %d), occupancy %.3f", name,
                 n_events, seed, float(np.mean(showers > 0)))
    return ShowerSet(
        conditions={"energy": energy.astype(np.float32)},
        cells={"showers": showers},
        attrs={"detector": name, "dataset": g.dataset, "particle": g.particle,
               "seed": int(seed), "source": "calotune synthetic (GFlash)"},
    )
