"""CaloChallenge 2022 high-level features (HLF) for any CaloChallenge-like geometry.

Definitions follow the CaloChallenge 2022 evaluation (community paper arXiv 2410.21611,
and ``HighLevelFeatures.py`` of the challenge's public evaluation code):

- the readout threshold is applied first: voxels below it become 0;
- E_tot, E_tot / E_inc, E_layer[l], sparsity[l] = 1 - fraction of voxels above threshold;
- centre of energy EC = sum(x E) / (sum(E) + 1e-16) and width
  sqrt(max(<x^2> - <x>^2, 0)) for x in eta, phi (layers binned in alpha) and r (all layers),
  with eta = r_mid cos(alpha_mid), phi = r_mid sin(alpha_mid) and alpha centres on
  [-pi, pi].

A geometry is described by :class:`Binning` (radial edges and number of angular bins per
layer, in the CaloChallenge voxel order layer -> alpha -> r), so the same code serves
datasets 1, 2, 3 and any future voxelisation of the same kind. The binnings of the
challenge's histograms (arXiv 2410.21611) live here too, because they depend on the
geometry and on the reference sample, and both the detector's search scores and
``calotune.evaluate`` must use exactly the same ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from calotune.metrics.separation import separation_power

__all__ = [
    "FEATURE_GROUPS",
    "Binning",
    "HighLevelFeatures",
    "Layer",
    "apply_threshold",
    "challenge_bins",
    "compute_hlf",
    "group_means",
    "separation_powers",
    "voxel_spectrum_values",
]

#: added to every denominator, as in the challenge code, so empty layers give 0, not NaN.
EPS = 1e-16

#: per-layer feature names, in the order they appear in reports.
LAYER_FEATURES = ("e_layer", "ec_eta", "ec_phi", "ec_r", "width_eta", "width_phi", "width_r",
                  "sparsity")

#: objective groups -> member features (means over all layers of all members).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "etot_einc": ("etot_einc",),
    "e_layer": ("e_layer",),
    "center": ("ec_eta", "ec_phi", "ec_r"),
    "width": ("width_eta", "width_phi", "width_r"),
    "sparsity": ("sparsity",),
    "voxel_energy": ("voxel_energy",),
}


@dataclass(frozen=True)
class Layer:
    """One readout layer: radial bin edges (mm) and the number of equal angular bins."""

    r_edges: tuple[float, ...]
    n_alpha: int

    def __post_init__(self) -> None:
        edges = tuple(float(r) for r in self.r_edges)
        object.__setattr__(self, "r_edges", edges)
        object.__setattr__(self, "n_alpha", int(self.n_alpha))
        if len(edges) < 2 or not all(b > a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"r_edges must be >= 2 strictly increasing values, got {edges}")
        if self.n_alpha < 1:
            raise ValueError(f"n_alpha must be >= 1, got {self.n_alpha}")

    @property
    def n_r(self) -> int:
        return len(self.r_edges) - 1

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha

    @property
    def r_mid(self) -> np.ndarray:
        e = np.asarray(self.r_edges)
        return 0.5 * (e[:-1] + e[1:])

    @property
    def alpha_mid(self) -> np.ndarray:
        """Angular bin centres on [-pi, pi], as the challenge's XMLHandler defines them."""
        e = np.linspace(-np.pi, np.pi, self.n_alpha + 1)
        return 0.5 * (e[:-1] + e[1:])

    def voxel_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(r, eta, phi) of every voxel of this layer in file order (alpha-major, then r)."""
        r = np.tile(self.r_mid, self.n_alpha)
        alpha = np.repeat(self.alpha_mid, self.n_r)
        return r, r * np.cos(alpha), r * np.sin(alpha)


@dataclass(frozen=True)
class Binning:
    """A CaloChallenge-like voxelisation plus the histogram ranges used to score it.

    layer_ids: the detector's own layer numbers (ds1 photons: 0, 1, 2, 3, 12), used as
        keys in reports so that numbers can be compared with the challenge's plots.
    threshold_mev: readout threshold applied before any feature is computed.
    ec_limit_mm / width_limit_mm: per layer, the histogram range of EC eta/phi
        (+-limit) and width eta/phi ([0, limit]); ec_r_limit_mm / width_r_limit_mm the
        range of EC_r and width_r. Empty tuples -> derived from the radial extent
        (see :meth:`limits`).
    energy_ranges_mev / etot_einc_ranges: datasets with discrete incident energies
        (ds1) get one E_tot / E_inc histogram per energy: events with
        low <= E_inc < high, histogrammed on 20 equal bins over the matching
        (low, high) of ``etot_einc_ranges``. Empty -> no per-energy histograms.
    """

    layers: tuple[Layer, ...]
    layer_ids: tuple[int, ...] = ()
    threshold_mev: float = 0.0
    ec_limit_mm: tuple[float, ...] = ()
    width_limit_mm: tuple[float, ...] = ()
    ec_r_limit_mm: tuple[float, ...] = ()
    width_r_limit_mm: tuple[float, ...] = ()
    energy_ranges_mev: tuple[tuple[float, float], ...] = ()
    etot_einc_ranges: tuple[tuple[float, float], ...] = ()
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        ids = tuple(int(i) for i in self.layer_ids) or tuple(range(len(layers)))
        object.__setattr__(self, "layer_ids", ids)
        if len(ids) != len(layers):
            raise ValueError(f"{len(ids)} layer_ids for {len(layers)} layers")
        for name in ("ec_limit_mm", "width_limit_mm", "ec_r_limit_mm", "width_r_limit_mm"):
            value = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, value)
            if value and len(value) != len(layers):
                raise ValueError(f"{name} has {len(value)} entries for {len(layers)} layers")
        ranges = tuple((float(a), float(b)) for a, b in self.energy_ranges_mev)
        hist_ranges = tuple((float(a), float(b)) for a, b in self.etot_einc_ranges)
        object.__setattr__(self, "energy_ranges_mev", ranges)
        object.__setattr__(self, "etot_einc_ranges", hist_ranges)
        if len(ranges) != len(hist_ranges):
            raise ValueError(f"{len(ranges)} energy_ranges_mev for {len(hist_ranges)} "
                             "etot_einc_ranges")
        offsets = np.concatenate([[0], np.cumsum([lay.n_voxels for lay in layers])])
        object.__setattr__(self, "_offsets", tuple(int(o) for o in offsets))

    @property
    def n_voxels(self) -> int:
        return self._offsets[-1]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_slice(self, index: int) -> slice:
        """Columns of layer ``index`` (position, not layer id) in the flat voxel vector."""
        return slice(self._offsets[index], self._offsets[index + 1])

    @property
    def alpha_layers(self) -> tuple[int, ...]:
        """Positions of layers binned in alpha (n_alpha > 1): only they get eta/phi features."""
        return tuple(i for i, lay in enumerate(self.layers) if lay.n_alpha > 1)

    def limits(self, index: int) -> tuple[float, float, float, float]:
        """(EC eta/phi limit, width eta/phi limit, EC_r limit, width_r limit) in mm.

        Without explicit limits the ranges scale with the layer's radial extent R:
        0.72 R for EC and widths, R for EC_r and R / 2 for width_r, which reproduces the
        challenge's ds2/ds3 ranges (30, 30, 42, 20 mm for R = 41.85 mm) to within 1 mm.
        """
        r_max = self.layers[index].r_edges[-1]
        default = (0.72 * r_max, 0.72 * r_max, r_max, 0.5 * r_max)
        given = (self.ec_limit_mm, self.width_limit_mm, self.ec_r_limit_mm,
                 self.width_r_limit_mm)
        return tuple(g[index] if g else d for g, d in zip(given, default, strict=True))  # type: ignore[return-value]


def apply_threshold(showers: np.ndarray, threshold_mev: float) -> np.ndarray:
    """Voxels below the readout threshold set to 0 (a copy; the input is left alone).

    Done before every feature because a detector never records those energies; a
    generator must not be rewarded or penalised for sub-threshold noise.
    """
    x = np.asarray(showers)
    return np.where(x >= threshold_mev, x, 0).astype(x.dtype, copy=False)


@dataclass
class HighLevelFeatures:
    """Per-event high-level features of a sample. Arrays have N rows.

    Per-layer arrays have one column per layer (``layer_ids``); eta/phi arrays one column
    per alpha-binned layer (``alpha_layer_ids``).
    """

    e_inc: np.ndarray
    e_tot: np.ndarray
    e_layer: np.ndarray
    sparsity: np.ndarray
    ec_eta: np.ndarray
    ec_phi: np.ndarray
    width_eta: np.ndarray
    width_phi: np.ndarray
    ec_r: np.ndarray
    width_r: np.ndarray
    layer_ids: tuple[int, ...]
    alpha_layer_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.e_tot)

    @property
    def etot_einc(self) -> np.ndarray:
        return self.e_tot / self.e_inc

    def subset(self, index: np.ndarray | slice) -> HighLevelFeatures:
        """Features of the selected events (HLF are per event, so halves need no recompute)."""
        arrays = {
            name: getattr(self, name)[index]
            for name in ("e_inc", "e_tot", "e_layer", "sparsity", "ec_eta", "ec_phi",
                         "width_eta", "width_phi", "ec_r", "width_r")
        }
        return HighLevelFeatures(**arrays, layer_ids=self.layer_ids,
                                 alpha_layer_ids=self.alpha_layer_ids)

    def layer_feature(self, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """(N, n_columns) array of a per-layer feature and the layer ids of its columns."""
        ids = self.alpha_layer_ids if name.endswith(("_eta", "_phi")) else self.layer_ids
        return getattr(self, name), ids

    def high_level_vector(self) -> np.ndarray:
        """The challenge's high-level classifier input, also the FPD/KPD feature vector.

        [log10 E_inc, log10(E_layer + 1e-8), EC_eta / 100, EC_phi / 100, width_eta / 100,
        width_phi / 100 (alpha-binned layers), log10(E_tot + 1e-8), sparsity,
        EC_r / 100, width_r / 100] (arXiv 2410.21611, 2211.10295; CaloChallenge
        ``prepare_high_data_for_classifier``, with the r columns it has had since
        November 2023: 30 columns for ds1-photons, 362 for ds2/ds3). FPD/KPD values
        (arXiv 2211.10295, as used in arXiv 2410.21611) are only comparable with published
        ones on exactly this vector. The logarithms are taken in the dtype the energies
        were computed in, as the challenge code does; the 1e-8 keeps empty layers finite.
        """
        return np.concatenate(
            [
                np.log10(self.e_inc)[:, None],
                np.log10(self.e_layer + 1e-8),
                self.ec_eta / 1e2,
                self.ec_phi / 1e2,
                self.width_eta / 1e2,
                self.width_phi / 1e2,
                np.log10(self.e_tot + 1e-8)[:, None],
                self.sparsity,
                self.ec_r / 1e2,
                self.width_r / 1e2,
            ],
            axis=1,
        ).astype(np.float64, copy=False)


def _centre_and_width(x: np.ndarray, energy: np.ndarray, e_sum: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and spread of coordinate x; the clip guards rounding below 0.

    The operations and their order are those of the challenge's ``HighLevelFeatures``
    (element-wise products summed per event, the denominator summed in the shower dtype
    plus 1e-16) so that values on a histogram edge fall into the same bin as there.
    """
    denominator = e_sum + EPS
    mean = (x * energy).sum(axis=-1) / denominator
    second = (x * x * energy).sum(axis=-1) / denominator
    return mean, np.sqrt((second - mean**2).clip(min=0.0))


def _work_dtype(x: np.ndarray) -> np.dtype:
    """The dtype the energy sums are done in: the data's own if float32/float64.

    The challenge evaluation sums E_layer and E_tot in the file's dtype; doing the same
    keeps every sum bit-identical, which matters for the event that defines the top
    edge of the log E_layer binning (an off-by-one-ulp maximum moves it out of range).
    """
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def compute_hlf(showers: np.ndarray, energy: np.ndarray, binning: Binning) -> HighLevelFeatures:
    """All CaloChallenge high-level features of a sample (threshold applied first).

    Args:
        showers: (N, n_voxels) MeV in CaloChallenge order (layer, alpha, r).
        energy: (N,) or (N, 1) incident energies, MeV.
        binning: the geometry.

    Returns:
        :class:`HighLevelFeatures`. E_inc, E_tot and E_layer keep the showers' dtype
        (float32 or float64; anything else becomes float64), because the challenge code
        (arXiv 2410.21611, ``HighLevelFeatures.CalculateFeatures``) sums in the file's
        dtype; centres, widths and sparsity are float64 as there.
    """
    x = np.asarray(showers)
    if x.ndim != 2 or x.shape[1] != binning.n_voxels:
        raise ValueError(f"showers must be (N, {binning.n_voxels}), got {x.shape}")
    dtype = _work_dtype(x)
    x = x.astype(dtype, copy=False)
    e_inc = np.asarray(energy)
    e_inc = e_inc.astype(_work_dtype(e_inc), copy=False).reshape(-1)
    if len(e_inc) != len(x):
        raise ValueError(f"{len(e_inc)} energies for {len(x)} showers")
    x = apply_threshold(x, binning.threshold_mev)
    n, n_layers = len(x), binning.n_layers
    n_alpha_layers = len(binning.alpha_layers)
    e_layer = np.empty((n, n_layers), dtype=dtype)
    sparsity = np.empty((n, n_layers))
    ec_r = np.empty((n, n_layers))
    width_r = np.empty((n, n_layers))
    ec_eta = np.empty((n, n_alpha_layers))
    ec_phi = np.empty((n, n_alpha_layers))
    width_eta = np.empty((n, n_alpha_layers))
    width_phi = np.empty((n, n_alpha_layers))
    column = 0
    for i, layer in enumerate(binning.layers):
        block = x[:, binning.layer_slice(i)]
        e_sum = block.sum(axis=-1)
        e_layer[:, i] = e_sum
        sparsity[:, i] = 1.0 - (block > 0).mean(axis=-1)
        r, eta, phi = layer.voxel_coordinates()
        ec_r[:, i], width_r[:, i] = _centre_and_width(r, block, e_sum)
        if layer.n_alpha > 1:
            ec_eta[:, column], width_eta[:, column] = _centre_and_width(eta, block, e_sum)
            ec_phi[:, column], width_phi[:, column] = _centre_and_width(phi, block, e_sum)
            column += 1
    return HighLevelFeatures(
        e_inc=e_inc,
        # summed over all voxels at once, as the challenge does (not the sum of E_layer,
        # which rounds differently in float32)
        e_tot=x.sum(axis=-1),
        e_layer=e_layer,
        sparsity=sparsity,
        ec_eta=ec_eta,
        ec_phi=ec_phi,
        width_eta=width_eta,
        width_phi=width_phi,
        ec_r=ec_r,
        width_r=width_r,
        layer_ids=binning.layer_ids,
        alpha_layer_ids=tuple(binning.layer_ids[i] for i in binning.alpha_layers),
    )


def voxel_spectrum_values(showers: np.ndarray, threshold_mev: float) -> np.ndarray:
    """Energies of the voxels at or above threshold, flattened (what the spectrum shows).

    Zero voxels fall below the challenge's log binning and would be dropped by its
    histogram anyway; selecting them out here keeps memory and time small for ds3. The
    values keep the showers' dtype (see :func:`_work_dtype`).
    """
    x = np.asarray(showers)
    return x[(x >= threshold_mev) & (x > 0)].astype(_work_dtype(x), copy=False)


def _log_edges(low: float, high: float, n_edges: int,
               dtype: np.dtype | type = np.float64) -> np.ndarray:
    """``logspace(log10(low), log10(high), n)`` with log10(high) taken in ``dtype``.

    The challenge code takes log10 of the reference maximum in the file's dtype (a
    float32 log10 rounds the top edge by up to ~1e-7 relative), so the event that sets
    the maximum is inside or outside the last bin exactly as there. Robust to an empty
    reference (max <= low).
    """
    low = max(low, 1e-6)
    if not high > low:
        high = 10.0 * low
    return np.logspace(np.log10(low), np.log10(np.dtype(dtype).type(high)), n_edges)


#: ds1 per-energy E_tot / E_inc histograms have 20 bins (challenge helper functions).
ETOT_EINC_PER_ENERGY_EDGES = 21


def challenge_bins(binning: Binning, reference: HighLevelFeatures,
                   voxel_max: float | None = None) -> dict[str, list[np.ndarray]]:
    """The CaloChallenge histogram binnings (arXiv 2410.21611), fixed by the reference.

    Returns feature -> list of edge arrays, one per column of that feature (one per layer,
    or per alpha-binned layer for eta/phi; one entry for E_tot/E_inc and voxel_energy; one
    per discrete incident energy for "etot_einc_per_energy").
    Fixing edges from the reference once means every generated sample (and the
    reference-vs-reference floor) is scored on identical bins. The log edges take the
    reference maximum in the reference's energy dtype, as the challenge code does.
    """
    thr = binning.threshold_mev
    floor = thr if thr > 0 else 1e-3
    dtype = reference.e_layer.dtype
    bins: dict[str, list[np.ndarray]] = {"etot_einc": [np.linspace(0.5, 1.5, 101)]}
    bins["e_layer"] = [
        _log_edges(floor, reference.e_layer[:, i].max(initial=0.0), 40, dtype)
        for i in range(binning.n_layers)
    ]
    lim = [binning.limits(i) for i in range(binning.n_layers)]
    alpha = binning.alpha_layers
    bins["ec_eta"] = [np.linspace(-lim[i][0], lim[i][0], 101) for i in alpha]
    bins["ec_phi"] = [np.linspace(-lim[i][0], lim[i][0], 101) for i in alpha]
    bins["width_eta"] = [np.linspace(0.0, lim[i][1], 101) for i in alpha]
    bins["width_phi"] = [np.linspace(0.0, lim[i][1], 101) for i in alpha]
    bins["ec_r"] = [np.linspace(0.0, lim[i][2], 101) for i in range(binning.n_layers)]
    bins["width_r"] = [np.linspace(0.0, lim[i][3], 101) for i in range(binning.n_layers)]
    bins["sparsity"] = [np.linspace(0.0, 1.0, 21) for _ in range(binning.n_layers)]
    if binning.energy_ranges_mev:
        bins["etot_einc_per_energy"] = [
            np.linspace(lo, hi, ETOT_EINC_PER_ENERGY_EDGES) for lo, hi in binning.etot_einc_ranges
        ]
    if voxel_max is not None:
        bins["voxel_energy"] = [_log_edges(floor, voxel_max, 50, dtype)]
    return bins


def _per_energy_separation(reference: HighLevelFeatures, generated: HighLevelFeatures,
                           ranges: Sequence[tuple[float, float]],
                           edges: Sequence[np.ndarray]) -> list[float]:
    """<S^2> of E_tot / E_inc per incident-energy range (ds1's 15 discrete energies).

    An energy with no event (or nothing in range) on either side gives NaN, as the
    challenge's density histogram does, rather than a made-up 0 or 1.
    """
    out = []
    for (lo, hi), e in zip(ranges, edges, strict=True):
        ref_sel = (reference.e_inc >= lo) & (reference.e_inc < hi)
        gen_sel = (generated.e_inc >= lo) & (generated.e_inc < hi)
        ref_v = reference.etot_einc[ref_sel]
        gen_v = generated.etot_einc[gen_sel]
        in_range = [np.count_nonzero((v >= e[0]) & (v <= e[-1])) for v in (ref_v, gen_v)]
        out.append(separation_power(ref_v, gen_v, e) if min(in_range) > 0 else float("nan"))
    return out


def separation_powers(
    reference: HighLevelFeatures,
    generated: HighLevelFeatures,
    bins: dict[str, list[np.ndarray]],
    reference_voxels: np.ndarray | None = None,
    generated_voxels: np.ndarray | None = None,
    energy_ranges_mev: Sequence[tuple[float, float]] = (),
) -> dict[str, list[float]]:
    """Separation power (arXiv 2009.03796 eq. 15) of every HLF histogram.

    Out-of-range values are dropped, as the challenge's ``np.histogram`` does, so that
    numbers are comparable with published ones. ``*_voxels`` are the outputs of
    :func:`voxel_spectrum_values`; the voxel spectrum is scored only when both are given
    and ``bins`` has a "voxel_energy" entry. ``energy_ranges_mev`` (``Binning``'s) adds
    the ds1 per-energy E_tot / E_inc histograms ("etot_einc_per_energy").

    Returns feature -> list of <S^2> values (one per column, see :func:`challenge_bins`).
    """
    out: dict[str, list[float]] = {
        "etot_einc": [separation_power(reference.etot_einc, generated.etot_einc,
                                       bins["etot_einc"][0])]
    }
    for name in LAYER_FEATURES:
        ref, _ = reference.layer_feature(name)
        gen, _ = generated.layer_feature(name)
        out[name] = [
            separation_power(ref[:, j], gen[:, j], edges) for j, edges in enumerate(bins[name])
        ]
    if energy_ranges_mev and "etot_einc_per_energy" in bins:
        out["etot_einc_per_energy"] = _per_energy_separation(
            reference, generated, energy_ranges_mev, bins["etot_einc_per_energy"])
    if reference_voxels is not None and generated_voxels is not None and "voxel_energy" in bins:
        out["voxel_energy"] = [
            separation_power(reference_voxels, generated_voxels, bins["voxel_energy"][0])
        ]
    return out


def group_means(separations: dict[str, Sequence[float]]) -> dict[str, float]:
    """Mean <S^2> per :data:`FEATURE_GROUPS` group, plus "mean" over every histogram.

    Means over layers are what the challenge papers quote ("per-layer <S^2> mean 0.009 for
    E_layer"); the overall mean is a single bounded objective for a search.
    """
    means: dict[str, float] = {}
    everything: list[float] = []
    for group, members in FEATURE_GROUPS.items():
        values = [v for m in members for v in separations.get(m, [])]
        if values:
            means[group] = float(np.mean(values))
        everything.extend(values)
    means["mean"] = float(np.mean(everything)) if everything else float("nan")
    return means
