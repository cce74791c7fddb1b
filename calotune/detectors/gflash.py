"""GFlash electromagnetic and Bock hadronic shower profiles, shared by every detector.

One implementation, so that the ZDC and the CaloChallenge presets cannot drift apart
(they had two copies that differed: only one kept ln y in GFlash's range):

- longitudinal electromagnetic profile: Grindhammer & Peters, "The parameterized
  simulation of electromagnetic showers in homogeneous and sampling calorimeters",
  hep-ex/0001020: a Gamma law in t = depth / X0 whose ln T and ln alpha fluctuate with
  correlated Gaussians;
- radial electromagnetic profile (same paper): a core + tail mixture of
  f(r) = 2 r R^2 / (r^2 + R^2)^2 in Moliere radii, widening with tau = t / T;
- hadronic longitudinal profile: Bock et al., NIM 186 (1981) 533, a Gamma law in
  s / lambda with a = 0.6165 + 0.3183 ln E, d = 0.9099 - 0.0237 ln E (E in GeV), and the
  electromagnetic part of hadron showers on the X0 scale with b = 0.2198; the mean
  electromagnetic fraction 1 - (E / GeV)^-0.18 (Gabriel et al., NIM A 338 (1994) 336).

Why ln y is clamped: GFlash's fits hold for y = E / E_c well above 1, and
<ln T> = ln(ln y - 0.812) is undefined for ln y <= 0.812 (y < 2.25). The few-MeV
electromagnetic sub-showers of low-energy pions reach that region, so y is floored at 3
and the fitted widths sigma(ln T), sigma(ln alpha), which diverge at ln y = 1.11 and 0.67,
are capped at 0.6. Both limits are inactive for every shower above ~100 MeV / E_c, so
showers inside the fit range are exactly the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: b of Bock et al.'s electromagnetic term (per X0).
BOCK_B = 0.2198
#: floor of y = E / E_c: ln(ln y - 0.812) needs y > 2.25.
_MIN_Y = 3.0
#: cap of the fitted sigma(ln T), sigma(ln alpha) near their poles.
_MAX_SIGMA = 0.6
#: far behind the maximum the radial profile no longer changes; exp(k4 tau) must not overflow.
_MAX_TAU = 20.0


def longitudinal(
    energy_mev: np.ndarray, z: float, critical_mev: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-shower (alpha, beta, T) of GFlash's Gamma profile (hep-ex/0001020, homogeneous media).

    Draws two standard normals per shower (in that order: reproducible samples depend
    on it). The correlation rho ~ 0.6 between ln T and ln alpha makes late-developing
    showers also longer, which correlates the layer energies as in Geant4.
    alpha is floored at 1.05 because T = (alpha - 1) / beta needs alpha > 1.
    """
    ln_y = np.log(np.maximum(np.asarray(energy_mev) / critical_mev, _MIN_Y))
    mean_ln_t = np.log(ln_y - 0.812)
    mean_ln_a = np.log(0.81 + (0.458 + 2.26 / z) * ln_y)
    sigma_t = np.minimum(1.0 / (-1.4 + 1.26 * ln_y), _MAX_SIGMA)
    sigma_a = np.minimum(1.0 / (-0.58 + 0.86 * ln_y), _MAX_SIGMA)
    rho = np.clip(0.705 - 0.023 * ln_y, -1.0, 1.0)
    z1, z2 = rng.standard_normal((2, len(ln_y)))
    plus, minus = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    t_max = np.exp(mean_ln_t + sigma_t * (plus * z1 + minus * z2))
    alpha = np.exp(mean_ln_a + sigma_a * (plus * z1 - minus * z2))
    alpha = np.maximum(alpha, 1.05)
    return alpha, (alpha - 1.0) / t_max, t_max


def radial(energy_gev: np.ndarray, tau: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_core, R_tail, p_core) in Moliere radii at relative depth tau = t / T (hep-ex/0001020).

    tau is clipped to [0, 20] so that exp(k4 tau) cannot overflow; radii are floored at
    1e-3 R_M so that the profile stays a proper density.
    """
    tau = np.clip(tau, 0.0, _MAX_TAU)
    ln_e = np.log(energy_gev)
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k1, k2, k3 = 0.659 - 0.00309 * z, 0.645, -2.59
    k4 = 0.3585 + 0.0412 * ln_e
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    p1, p2 = 2.632 - 0.00094 * z, 0.401 + 0.00187 * z
    p3 = 1.313 - 0.0686 * ln_e
    u = (p2 - tau) / p3
    p_core = np.clip(p1 * np.exp(u - np.exp(u)), 0.0, 1.0)
    return np.maximum(r_core, 1e-3), np.maximum(r_tail, 1e-3), p_core


def radial_fractions(edges: np.ndarray, radii: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> np.ndarray:
    """(n, n_r) share of a mixture of GFlash radial profiles in each ring [edges[k], edges[k+1]).

    The radial form 2 r R^2 / (r^2 + R^2)^2 has the CDF r^2 / (r^2 + R^2), so rings get
    exact shares; energy beyond the last edge is lateral leakage. ``edges`` and the radii
    share one unit.
    """
    e2 = np.asarray(edges)[None, :] ** 2
    out: np.ndarray | float = 0.0
    for radius, weight in zip(radii, weights, strict=True):
        cdf = e2 / (e2 + radius[:, None] ** 2)
        out = out + weight[:, None] * np.diff(cdf, axis=1)
    return np.asarray(out)


def cell_fractions(
    x_edges: np.ndarray, y_edges: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray
) -> np.ndarray:
    """Share of the GFlash radial form around (cx, cy) in each rectangular cell, (M, nx, ny).

    In the plane the form is R^2 / (pi (r^2 + R^2)^2), whose integral over [0, x] x [0, y]
    is exactly (x/a atan(y/a) + y/b atan(x/b)) / 2 pi with a = sqrt(x^2 + R^2),
    b = sqrt(y^2 + R^2), so cells get exact shares without sampling ~10^4 energy spots per
    shower. float32 on purpose: numpy's float32 arctan is vectorised and ~20x faster; the
    rounding (~1e-7 of the shower) only touches cells far below any threshold.
    """
    x = (x_edges[None, :] - cx[:, None]).astype(np.float32)  # (M, nx+1)
    y = (y_edges[None, :] - cy[:, None]).astype(np.float32)  # (M, ny+1)
    r2 = np.square(radius).astype(np.float32)[:, None]
    a, b = np.sqrt(x * x + r2), np.sqrt(y * y + r2)
    corner = (x / a)[:, :, None] * np.arctan(y[:, None, :] / a[:, :, None])
    corner += (y / b)[:, None, :] * np.arctan(x[:, :, None] / b[:, None, :])  # (M, nx+1, ny+1)
    return np.maximum(np.diff(np.diff(corner, axis=1), axis=2) / (2 * np.pi), 0.0)


def bock_parameters(energy_gev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, d) of Bock et al.'s hadronic Gamma profile in s / lambda (NIM 186 (1981) 533).

    a is floored at 0.2: the fit's a = 0.6165 + 0.3183 ln E turns negative below
    ~0.14 GeV, where a Gamma law is undefined (sub-GeV pion energies only).
    """
    ln_e = np.log(energy_gev)
    return np.maximum(0.6165 + 0.3183 * ln_e, 0.2), 0.9099 - 0.0237 * ln_e


def em_fraction_mean(energy_gev: np.ndarray) -> np.ndarray:
    """Mean electromagnetic fraction of a hadron shower, 1 - (E / GeV)^-0.18 (Gabriel et al.,
    NIM A 338 (1994) 336); callers clip it to the range their Beta law can take."""
    return 1.0 - np.asarray(energy_gev) ** (-0.18)
