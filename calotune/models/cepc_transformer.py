"""CEPC cell transformer: a decoder-only transformer that writes a shower cell by cell.

The design follows the CEPC group's slides (seed 001, "Generative Model for CEPC Detector
Simulation"):

    four-momentum p4 -> BOS -> cell 1 -> cell 2 -> ... (cells sorted by decreasing energy)

A cell is (layer, dz, dphi, E): its layer, its z and phi cell offsets from the cell the
particle's straight line crosses in that layer, and its energy. Offsets from the axis
rather than absolute cells make every shower look alike to the network wherever it hits
the barrel; the seed's version regressed absolute bin indices as floats and rounded them
at inference, and its generated cells collapsed onto one position. Here each position is
a categorical distribution (layer, then dz given the layer, then dphi given both: the
shower widens with depth), so sampling needs no rounding and temperature is meaningful.
Energies are log shares y = log(E / E_vis): the first cell's is Gaussian, every later
cell's is the previous one minus a drop >= 0 (log(drop + c) Gaussian, c the median drop),
so the sequence is energy-sorted by construction and walks down to the threshold.

Losses (weights in Config; the seed's terms):

- the sequence likelihood of the true cells (cross-entropies of the positions plus the
  energy term times ``energy_term_weight``, the seed's "separate weight for the energy
  term" against the position features);
- the seed's soft-histogram Jensen-Shannon loss over the cell features (layer, dz, dphi,
  E): per event, the predicted cells' histograms are the summed predictive
  distributions (softmax probabilities; Gaussian masses per energy bin), so gradients
  pass through them (hard binning blocked them in the seed's first version);
- a total-energy loss: the likelihood of E_vis / E_inc under a dedicated head, and the
  squared log of the predicted shares' sum (they must add up to the kept cells' share);
- a stop loss for the learned stop (balanced per sequence: one stop against n steps,
  the imbalance that made the seed's EOS loss fail).

Total energy: E_vis = E_inc x f is sampled first from the total head and the generated
cells are rescaled to add up to it, so the total tracks the incident energy however many
cells are written (the seed generated 43.6 vs 37.1: a model that does not know when to
stop overshoots). Stop: ``stop_mode="threshold"`` (the seed's choice, the default)
ends an event at its first cell below ``stop_threshold`` x the smallest cell energy of
the training split, which is the readout threshold: in energy order every later cell
would be below it too, and energies are clamped non-increasing while sampling, so the
rule always terminates. It relies on the energy ordering being learned, which the
sorted training sequences and the clamp make easy; ``"learned"`` samples the stop head
instead (both heads are always trained, so the choice is a sampling parameter).

Against collapse: sampling temperature for the positions and a separate one for the
energies (``temperature``, ``energy_temperature``), and parallel scheduled sampling
(Bengio et al. 2015, arXiv 1506.03099; the parallel form of Duckworth et al. 2019,
arXiv 1906.04331), the seed's "partial autoregression during teacher forcing": a
``scheduled_sampling`` share of the input cells is replaced by the model's own samples
from a first teacher-forced pass, so it learns to continue from its own outputs. A
collapse detector (:meth:`CEPCTransformer.epoch_metrics`) samples fixed probe conditions
after every epoch and prunes the trial with the reason (duplicate events, cells repeating
within events, first-cell spread far below the training data's).

Transformer: pre-norm GPT blocks (Radford et al. 2019; Vaswani et al. 2017, arXiv
1706.03762) with a key/value cache, so sampling costs one token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calotune.models.base import (
    Batch,
    GenerativeModel,
    TrainContext,
    TrialPruned,
    bounded,
    check_fields,
)

DETECTORS = ("cepc-ecal",)

#: Config fields that change only how ``sample`` runs (never a parameter's shape).
SAMPLING_PARAMS: tuple[str, ...] = ("temperature", "energy_temperature", "stop_mode", "stop_threshold")
#: The one phase's training-only fields: a fine-tune search (``train_phases: [train]``)
#: varies these on the parent's weights (the default strict :meth:`inherit`).
PHASE_PARAMS: dict[str, tuple[str, ...]] = {
    "train": ("lr", "js_loss_weight", "total_energy_weight", "energy_term_weight", "stop_loss_weight",
              "scheduled_sampling"),
}

#: Condition features: normalised log E, p_z / p, p_T / p, sub-cell position of the axis
#: at the inner face in z and in phi.
N_COND = 5
#: Probe events sampled after every epoch by the collapse detector.
PROBE_EVENTS = 64
#: Collapse rules (seed 001: "after rounding, the entire generated cell sequence becomes
#: identical"): more than half the probe events identical to another one, more than half
#: the generated cells landing on a cell the event already has, or a first-cell spread
#: under a fifth of the training data's.
MAX_DUPLICATE_EVENTS = 0.5
MAX_REPEATED_CELLS = 0.5
MIN_FIRST_CELL_SPREAD = 0.2
#: Floor of the drop offset c (below).
MIN_DROP = 1e-3
#: Energy bins of the soft histogram, on the normalised log share (overflow at both ends).
JS_ENERGY_EDGES = torch.linspace(-3.0, 3.0, 13)


@dataclass
class Config:
    """Every tunable knob of the CEPC cell transformer (flat names, as search spaces use)."""

    width: int = bounded(64, gt=0)
    """Model width d; must divide by ``n_heads``. The seed used 8 heads and 4 layers on GPU."""
    n_heads: int = bounded(4, gt=0)
    """Attention heads."""
    n_layers: int = bounded(2, gt=0)
    """Transformer blocks."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout in the blocks; few-epoch trials rarely want it."""
    max_cells: int = bounded(192, gt=0)
    """Longest sequence: training keeps the ``max_cells`` most energetic cells of an event
    and sampling stops there. Set it above the data's largest cell count."""
    window: int = bounded(10, gt=0)
    """Largest |dz| and |dphi| in cells: cells farther from the axis are dropped from the
    training sequences (a few per mille of the energy at the default geometry)."""
    js_loss_weight: float = bounded(0.5, ge=0)
    """Weight of the seed's soft-histogram JS loss over (layer, dz, dphi, E)."""
    total_energy_weight: float = bounded(1.0, ge=0)
    """Weight of the total-energy loss (E_vis / E_inc likelihood + sum of shares)."""
    energy_term_weight: float = bounded(2.0, ge=0)
    """Weight of the energy term against the position terms, in the likelihood and in the
    JS loss (seed: positions as indices overshadow the energy feature)."""
    stop_loss_weight: float = bounded(0.5, ge=0)
    """Weight of the stop head's loss (used by ``stop_mode="learned"``)."""
    scheduled_sampling: float = bounded(0.25, ge=0, le=1)
    """Share of input cells replaced by the model's own samples (from the second epoch
    on; in the first one its samples are noise)."""
    lr: float = bounded(2e-3, gt=0)
    """Adam learning rate."""
    temperature: float = bounded(1.0, gt=0)
    """Sampling temperature of the position distributions (< 1 sharper, > 1 flatter)."""
    energy_temperature: float = bounded(1.0, ge=0)
    """Scale of the cell-energy noise: the first share's and the drops' Gaussian widths
    times this (0: their medians). The total E_vis / E_inc is always drawn untempered."""
    stop_mode: Literal["threshold", "learned"] = "threshold"
    """How an event ends: at the first cell below the threshold (the seed's choice) or
    when the learned stop head fires."""
    stop_threshold: float = bounded(1.0, gt=0)
    """Threshold stop: multiple of the training split's smallest cell energy."""
    collapse_check: bool = True
    """Prune a trial whose probe samples have collapsed (see the module docstring)."""

    def __post_init__(self) -> None:
        """Per-field bounds are declared above; only the rule between fields is here."""
        check_fields(self)
        if self.width % self.n_heads:
            raise ValueError(f"width % n_heads == 0 must hold, but got width={self.width}, n_heads={self.n_heads}")


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP, with an optional key/value cache."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); with ``cache`` ({"size": most tokens}) the T new tokens
        attend to all cached ones (from an empty cache, causally among themselves)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (u.view(b, t, self.heads, d // self.heads).transpose(1, 2) for u in (q, k, v))  # (B, H, T, dh)
        if cache is not None:  # preallocated (B, H, size, dh): one write per step, no re-copy
            start = int(cache.get("len", 0))
            if "k" not in cache:
                shape = (b, self.heads, int(cache["size"]), d // self.heads)
                cache["k"], cache["v"] = k.new_empty(shape), v.new_empty(shape)
            cache["k"][:, :, start:start + t], cache["v"][:, :, start:start + t] = k, v
            cache["len"] = start + t
            k, v = cache["k"][:, :, : start + t], cache["v"][:, :, : start + t]
            att = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) of histograms along the last axis (rows sum to 1)."""
    m = 0.5 * (p + q)
    kl = lambda a: (a * (torch.log(a + 1e-12) - torch.log(m + 1e-12))).sum(-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


class CEPCTransformer(GenerativeModel):
    """Autoregressive energy-sorted cell generator for the CEPC ECAL barrel."""

    def __init__(self, config: Config, geometry: Any) -> None:
        super().__init__()
        self.config = config
        g = geometry
        self.n_layers = int(g.n_layers)
        self.inner = float(g.inner_radius_mm)
        self.pitch = float(g.layer_mm)
        self.half = float(g.half_length_mm)
        self.z_cell = float(g.z_cell_mm)
        self.n_z = int(g.n_z_cells)
        self.n_phi = int(g.n_phi_cells)
        self.phi_cell = float(g.phi_cell_rad)
        d, k = config.width, 2 * config.window + 1
        self.cond = nn.Sequential(nn.Linear(N_COND, d), nn.SiLU(), nn.Linear(d, d))
        self.bos = nn.Parameter(torch.zeros(d))
        self.in_layer, self.in_dz, self.in_dphi = nn.Embedding(self.n_layers, d), nn.Embedding(k, d), nn.Embedding(k, d)
        self.in_energy = nn.Linear(1, d)
        self.pos = nn.Embedding(config.max_cells + 1, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.head_layer = nn.Linear(d, self.n_layers)
        self.sub_layer = nn.Embedding(self.n_layers, d)
        self.sub_dz, self.sub_dphi = nn.Embedding(k, d), nn.Embedding(k, d)
        self.head_dz = nn.Sequential(nn.SiLU(), nn.Linear(d, k))
        self.head_dphi = nn.Sequential(nn.SiLU(), nn.Linear(d, k))
        self.head_energy = nn.Sequential(nn.SiLU(), nn.Linear(d, 2))
        self.head_stop = nn.Linear(d, 1)
        self.head_total = nn.Sequential(nn.Linear(N_COND, d), nn.SiLU(), nn.Linear(d, 2))

    # ---- geometry: hits <-> cells ---------------------------------------------------
    def _axis(self, conditions: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(continuous z-cell coordinate of the axis per layer (B, L), phi cell of the axis (B,),
        condition features (B, N_COND))."""
        px, py, pz = (conditions[k].float() for k in ("px", "py", "pz"))
        pt = torch.hypot(px, py).clamp(min=1e-6)
        p = torch.sqrt(pt**2 + pz**2)
        r_mid = self.inner + (torch.arange(self.n_layers, device=px.device) + 0.5) * self.pitch
        z_axis = (r_mid[None, :] * (pz / pt)[:, None] + self.half) / self.z_cell  # (B, L)
        phi_axis = torch.remainder(torch.atan2(py, px), 2 * math.pi) / self.phi_cell  # (B,)
        z_in = (self.inner * pz / pt + self.half) / self.z_cell
        log_e = torch.log(conditions["energy"].float().clamp(min=1.0))
        prep = self.prepared
        mean, std = (prep.log_e_mean, prep.log_e_std) if hasattr(prep, "log_e_mean") else (10.0, 1.0)
        feats = torch.stack([(log_e - mean) / std, pz / p, pt / p,
                             2 * (z_in - z_in.floor()) - 1, 2 * (phi_axis - phi_axis.floor()) - 1], dim=1)
        return z_axis, phi_axis, feats

    def _cells(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training sequences from padded hits: cells in the window, by decreasing energy.

        Returns layer, dz, dphi (B, T) long (offsets shifted to 0..2W), y (B, T) raw log
        share log(E / E_vis), n (B,) sequence lengths, log_f (B,) log(E_vis / E_inc), and
        the dropped energy share (B,).
        """
        w = self.config.window
        hits, mask = batch["cells"]["hits"].float(), batch["cells"]["mask"].bool()
        z_axis, phi_axis, feats = self._axis(batch["conditions"])
        x, y, z, e = hits.unbind(-1)
        layer = torch.floor((torch.hypot(x, y) - self.inner) / self.pitch).long().clamp(0, self.n_layers - 1)
        iz = torch.floor((z + self.half) / self.z_cell).long()
        dz = iz - torch.gather(z_axis, 1, layer).floor().long()
        iphi = torch.floor(torch.remainder(torch.atan2(y, x), 2 * math.pi) / self.phi_cell).long()
        dphi = torch.remainder(iphi - phi_axis.floor().long()[:, None] + self.n_phi // 2, self.n_phi) - self.n_phi // 2
        e = torch.where(mask, e, torch.zeros_like(e))
        e_vis = e.sum(1).clamp(min=1e-6)
        valid = mask & (e > 0) & (dz.abs() <= w) & (dphi.abs() <= w)
        t = max(1, min(int(valid.sum(1).max()), self.config.max_cells))
        key = torch.where(valid, e, torch.full_like(e, -1.0))
        order = torch.argsort(key, dim=1, descending=True, stable=True)[:, :t]
        take = lambda a: torch.gather(a, 1, order)  # noqa: E731
        n = valid.sum(1).clamp(max=t)
        e_sorted = take(e).clamp(min=1e-6)
        kept = torch.arange(t, device=e.device)[None, :] < n[:, None]
        return {"layer": take(layer) * kept, "dz": (take(dz) + w).clamp(0, 2 * w) * kept,
                "dphi": (take(dphi) + w).clamp(0, 2 * w) * kept,
                "y": torch.log(e_sorted / e_vis[:, None]) * kept, "n": n, "kept": kept,
                "log_f": torch.log(e_vis / batch["conditions"]["energy"].float().clamp(min=1.0)),
                "feats": feats, "z_axis": z_axis, "phi_axis": phi_axis}

    # ---- preparation ---------------------------------------------------------------
    def prepare(self, train: Any) -> dict[str, Any]:
        """Normalisations, the readout threshold, and the collapse detector's references,
        from the training split (read in chunks through ``batch_arrays``)."""
        log_e = np.log(np.maximum(np.asarray(train.conditions["energy"], np.float64), 1.0))
        self.load_preparation({"log_e_mean": torch.tensor(float(log_e.mean())),
                               "log_e_std": torch.tensor(float(max(log_e.std(), 1e-3)))})
        ys, fs, firsts, lengths, y0s, drops, min_e = [], [], [], [], [], [], math.inf
        for lo in range(0, len(train), 256):
            arrays = train.batch_arrays(np.arange(lo, min(lo + 256, len(train))))
            batch = {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in arrays.items()}
            c = self._cells(batch)  # type: ignore[arg-type]
            ys.append(c["y"][c["kept"]])
            y0s.append(c["y"][:, 0][c["n"] > 0])
            later = c["kept"][:, 1:]
            drops.append((c["y"][:, :-1] - c["y"][:, 1:]).clamp(min=0)[later])
            fs.append(c["log_f"])
            lengths.append(c["n"])
            has = c["n"] > 0
            firsts.append(torch.stack([c[k][:, 0] for k in ("layer", "dz", "dphi")], 1)[has].float())
            hits = arrays["cells"]["hits"][arrays["cells"]["mask"]]
            if len(hits):
                min_e = min(min_e, float(hits[:, 3].min()))
        y, f, first = torch.cat(ys).double(), torch.cat(fs).double(), torch.cat(firsts)
        y0, drop = torch.cat(y0s).double(), torch.cat(drops).double()
        offset = float(drop.median()) if len(drop) else 0.05
        offset = max(offset, MIN_DROP)
        drop = torch.log(drop + offset)
        stat = lambda v, fallback: (float(v.mean()) if len(v) else fallback,  # noqa: E731
                                    float(max(v.std(), 1e-3)) if len(v) > 1 else 1.0)
        probe = min(PROBE_EVENTS, len(train))
        probe_cond = torch.stack([torch.as_tensor(np.asarray(train.conditions[k][:probe], np.float32))
                                  for k in ("energy", "px", "py", "pz")], 1)
        return {
            "log_e_mean": torch.tensor(float(log_e.mean())),
            "log_e_std": torch.tensor(float(max(log_e.std(), 1e-3))),
            "y_mean": torch.tensor(stat(y, -3.0)[0]), "y_std": torch.tensor(stat(y, -3.0)[1]),
            "y0_mean": torch.tensor(stat(y0, -1.0)[0]), "y0_std": torch.tensor(stat(y0, -1.0)[1]),
            "drop_mean": torch.tensor(stat(drop, -3.0)[0]), "drop_std": torch.tensor(stat(drop, -3.0)[1]),
            "drop_offset": torch.tensor(offset),
            "f_mean": torch.tensor(stat(f, 0.0)[0]), "f_std": torch.tensor(stat(f, 0.0)[1]),
            "min_cell_mev": torch.tensor(min_e if math.isfinite(min_e) else 1.0),
            "first_cell_spread": torch.tensor(float(first.std(0).square().sum().sqrt()) if len(first) > 1 else 1.0),
            "probe_conditions": probe_cond,
            "mean_length": float(torch.cat(lengths).float().mean()),
        }

    # ---- network ---------------------------------------------------------------------
    def _tokens(self, layer: torch.Tensor, dz: torch.Tensor, dphi: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        return self.in_layer(layer) + self.in_dz(dz) + self.in_dphi(dphi) + self.in_energy(yn[..., None])

    def _hidden(self, feats: torch.Tensor, layer: torch.Tensor, dz: torch.Tensor, dphi: torch.Tensor,
                yn: torch.Tensor) -> torch.Tensor:
        """Teacher-forced hidden states (B, T + 1, d): position t predicts cell t (0-based)
        from BOS and cells < t; position n predicts the stop."""
        c = self.cond(feats)[:, None, :]  # (B, 1, d)
        bos = self.bos.expand(len(feats), 1, -1)
        x = torch.cat([bos, self._tokens(layer, dz, dphi, yn)], 1) + c
        x = x + self.pos.weight[None, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _heads(self, h: torch.Tensor, layer: torch.Tensor, dz: torch.Tensor, dphi: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of layer, dz | layer, dphi | (layer, dz), and (mu, log sigma) of the energy."""
        h_dz = h + self.sub_layer(layer)
        h_dphi = h_dz + self.sub_dz(dz)
        h_e = h_dphi + self.sub_dphi(dphi)
        return self.head_layer(h), self.head_dz(h_dz), self.head_dphi(h_dphi), self.head_energy(h_e)

    def _energy_law(self, mu: torch.Tensor, log_sigma: torch.Tensor, first: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of the first cell's log share (Gaussian) or of log(drop + c) for a
        later cell's drop of log share from its predecessor (drop = exp(Gaussian) - c,
        floored at 0). c is the training split's median drop: a plain log-normal drop
        put ties and tiny drops in a long left tail, whose Gaussian fit widened sigma
        until the mean drop sampled was 1.5x the true one and showers stopped at 2/3 of
        their cells. The head works in units of the training split's spread of each, so
        an untrained head samples the data's marginal law instead of a first cell 10^4
        times too soft."""
        p = self.prepared
        loc = torch.where(first, mu * p.y0_std + p.y0_mean, mu * p.drop_std + p.drop_mean)
        scale = log_sigma.clamp(-5, 3).exp() * torch.where(first, p.y0_std, p.drop_std)
        return loc, scale

    # ---- training --------------------------------------------------------------------
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=self.config.lr)]

    def _own_positions(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One draw of (layer, dz, dphi) per position from the predictive distribution."""
        b, t, _ = h.shape
        draw = lambda logits: torch.multinomial(logits.reshape(b * t, -1).softmax(-1), 1).view(b, t)  # noqa: E731
        layer = draw(self.head_layer(h))
        h_dz = h + self.sub_layer(layer)
        dz = draw(self.head_dz(h_dz))
        return layer, dz, draw(self.head_dphi(h_dz + self.sub_dz(dz)))

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        cfg, prep = self.config, self.prepared
        c = self._cells(batch)
        layer, dz, dphi, kept, n = c["layer"], c["dz"], c["dphi"], c["kept"], c["n"]
        yn = ((c["y"] - prep.y_mean) / prep.y_std) * kept
        inputs = (layer, dz, dphi, yn)
        ss = cfg.scheduled_sampling if ctx.epoch >= 1 else 0.0
        if ss > 0:  # positions only: the energy chain below needs the true previous energy
            with torch.no_grad():
                own = self._own_positions(self._hidden(c["feats"], *inputs)[:, :-1])
                swap = (torch.rand(layer.shape, device=layer.device) < ss) & kept
                inputs = (*(torch.where(swap, o, i) for o, i in zip(own, inputs[:3], strict=True)), yn)
        h = self._hidden(c["feats"], *inputs)  # (B, T + 1, d)
        logit_l, logit_dz, logit_dphi, energy = self._heads(h[:, :-1], layer, dz, dphi)
        mu, log_sigma = energy.unbind(-1)
        log_sigma = log_sigma.clamp(-5, 3)
        m = kept.float()
        count = m.sum().clamp(min=1)
        ce = lambda logits, target: F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # noqa: E731
        first = torch.zeros_like(kept)
        first[:, 0] = True
        y_prev = torch.cat([c["y"][:, :1], c["y"][:, :-1]], 1)  # true previous log share
        log_drop = torch.log((y_prev - c["y"]).clamp(min=0) + prep.drop_offset)
        loc, scale = self._energy_law(mu, log_sigma, first)
        target = torch.where(first, c["y"], log_drop)
        nll_e = 0.5 * ((target - loc) / scale).square() + torch.log(scale)
        nll_pos = ((ce(logit_l, layer) + ce(logit_dz, dz) + ce(logit_dphi, dphi)) * m).sum() / count
        nll_energy = (nll_e * m).sum() / count
        # stop: per sequence, the stop at position n against the n "go on" positions
        stop_logit = self.head_stop(h).squeeze(-1)  # (B, T + 1)
        steps = torch.arange(h.shape[1], device=h.device)[None, :]
        is_stop = (steps == n[:, None]).float()
        bce = F.binary_cross_entropy_with_logits(stop_logit, is_stop, reduction="none")
        go = (bce * (steps < n[:, None])).sum(1) / n.clamp(min=1)
        loss_stop = (go + (bce * is_stop).sum(1)).mean()
        # total energy: the E_vis / E_inc head, and the predicted shares must add up
        f_mu, f_log_sigma = self.head_total(c["feats"]).unbind(-1)
        f_log_sigma = f_log_sigma.clamp(-6, 3)
        fn = (c["log_f"] - prep.f_mean) / prep.f_std
        nll_total = (0.5 * ((fn - f_mu) / f_log_sigma.exp()).square() + f_log_sigma).mean()
        y_pred = torch.where(first, loc, y_prev - (loc.exp() - prep.drop_offset).clamp(min=0))  # median
        share_pred = torch.logsumexp(torch.where(kept, y_pred, torch.full_like(y_pred, -1e4)), 1)
        share_true = torch.logsumexp(torch.where(kept, c["y"], torch.full_like(y_pred, -1e4)), 1)
        has = n > 0
        loss_shares = (share_pred - share_true)[has].square().mean() if has.any() else nll_total * 0
        loss_total = nll_total + loss_shares
        loss_js = self._js_loss(logit_l, logit_dz, logit_dphi, loc, scale, inputs=(layer, dz, dphi, c["y"]), m=m,
                                y_prev=y_prev, first=first)
        loss = (nll_pos + cfg.energy_term_weight * nll_energy + cfg.stop_loss_weight * loss_stop
                + cfg.total_energy_weight * loss_total + cfg.js_loss_weight * loss_js)
        ctx.step(loss, optimizers[0])
        return {"loss": float(loss.detach()), "loss_positions": float(nll_pos.detach()),
                "loss_energy": float(nll_energy.detach()), "loss_stop": float(loss_stop.detach()),
                "loss_total_energy": float(loss_total.detach()), "loss_js": float(loss_js.detach()),
                "scheduled_sampling": float(ss), "cells_per_event": float(n.float().mean())}

    def _js_loss(self, logit_l: torch.Tensor, logit_dz: torch.Tensor, logit_dphi: torch.Tensor, loc: torch.Tensor,
                 scale: torch.Tensor, *, inputs: tuple[torch.Tensor, ...], m: torch.Tensor,
                 y_prev: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The seed's per-event soft-histogram JS over (layer, dz, dphi, E), averaged.

        A predicted event's histogram is the sum of its steps' predictive distributions
        (softmax probabilities; for E, the predictive distribution's mass in each bin): a
        soft histogram whose gradient reaches every logit. The target is the hard histogram
        of the cells. The first cell's log share is Gaussian; a later one is the previous
        one minus a log-normal drop, whose CDF gives the bin masses exactly.
        """
        layer, dz, dphi, y = inputs
        n = m.sum(1, keepdim=True).clamp(min=1)
        has = m.sum(1) > 0
        if not has.any():
            return logit_l.sum() * 0
        parts = []
        for logits, target in ((logit_l, layer), (logit_dz, dz), (logit_dphi, dphi)):
            p = (logits.softmax(-1) * m[..., None]).sum(1) / n
            q = (F.one_hot(target, logits.shape[-1]).float() * m[..., None]).sum(1) / n
            parts.append(_js(p, q))
        edges = JS_ENERGY_EDGES.to(loc.device) * self.prepared.y_std + self.prepared.y_mean  # log share
        loc, scale = loc[..., None], scale[..., None]
        gauss = torch.special.ndtr((edges - loc) / scale)  # (B, T, E): P(y <= edge)
        drop = y_prev[..., None] - edges  # y <= edge  <=>  drop >= this
        tail = 1 - torch.special.ndtr((torch.log(drop.clamp(min=0) + self.prepared.drop_offset) - loc) / scale)
        inner = torch.where(first[..., None], gauss, torch.where(drop > 0, tail, torch.ones_like(tail)))
        zeros, ones = torch.zeros_like(inner[..., :1]), torch.ones_like(inner[..., :1])
        mass = torch.diff(torch.cat([zeros, inner, ones], -1), dim=-1)  # overflow bins at both ends
        p = (mass * m[..., None]).sum(1) / n
        bins = torch.bucketize(y, edges)
        q = (F.one_hot(bins, len(edges) + 1).float() * m[..., None]).sum(1) / n
        js = (parts[0] + parts[1] + parts[2] + self.config.energy_term_weight * _js(p, q)) / 4
        return js[has].mean()

    # ---- sampling --------------------------------------------------------------------
    def _generate(self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None
                  ) -> dict[str, torch.Tensor]:
        """Raw sequences: layer, dz, dphi (offsets), energy (B, T) in MeV, alive (B, T)
        (cells written), and the axis; energies are not yet rescaled."""
        cfg, prep = self.config, self.prepared
        device = self.bos.device
        draw_on = generator.device if generator is not None else device
        z_axis, phi_axis, feats = self._axis(conditions)
        b = len(feats)
        f_mu, f_log_sigma = self.head_total(feats).unbind(-1)
        noise = torch.randn(b, generator=generator, device=draw_on).to(device)
        # untempered: the total's law is one fitted Gaussian, and tempering it would only narrow
        # the energy resolution (energy_temperature 0.79 gave a spread of 0.039 against 0.054)
        log_f = (f_mu + f_log_sigma.clamp(-6, 3).exp() * noise) * prep.f_std + prep.f_mean
        e_vis = conditions["energy"].float() * log_f.exp()
        threshold = cfg.stop_threshold * prep.min_cell_mev
        c = self.cond(feats)
        x = (self.bos[None, :] + c + self.pos.weight[0])[:, None, :]
        caches: list[dict[str, Any]] = [{"size": cfg.max_cells} for _ in self.blocks]
        alive = torch.ones(b, dtype=torch.bool, device=device)
        y_prev = torch.zeros(b, device=device)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("layer", "dz", "dphi", "energy", "alive")}

        def draw(logits: torch.Tensor) -> torch.Tensor:
            probs = (logits / cfg.temperature).softmax(-1)
            return torch.multinomial(probs.to(draw_on), 1, generator=generator).squeeze(1).to(device)

        for t in range(cfg.max_cells):
            for block, cache in zip(self.blocks, caches, strict=True):
                x = block(x, cache)
            h = self.norm(x)[:, 0]
            if cfg.stop_mode == "learned" and t > 0:
                u = torch.rand(b, generator=generator, device=draw_on).to(device)
                alive &= ~(u < torch.sigmoid(self.head_stop(h).squeeze(-1)))
            layer = draw(self.head_layer(h))
            h_dz = h + self.sub_layer(layer)
            dz = draw(self.head_dz(h_dz))
            h_dphi = h_dz + self.sub_dz(dz)
            dphi = draw(self.head_dphi(h_dphi))
            mu, log_sigma = self.head_energy(h_dphi + self.sub_dphi(dphi)).unbind(-1)
            eps = torch.randn(b, generator=generator, device=draw_on).to(device)
            loc, scale = self._energy_law(mu, log_sigma, torch.full_like(mu, t == 0, dtype=torch.bool))
            noisy = loc + scale * cfg.energy_temperature * eps
            # the first cell's log share, then log-normal drops: energies never rise
            y = noisy if t == 0 else y_prev - (noisy.exp() - prep.drop_offset).clamp(min=0)
            y_prev = y
            yn = (y - prep.y_mean) / prep.y_std
            energy = e_vis * torch.exp(y)
            if cfg.stop_mode == "threshold" and t > 0:
                alive &= energy >= threshold
            for k, v in (("layer", layer), ("dz", dz), ("dphi", dphi), ("energy", energy), ("alive", alive.clone())):
                out[k].append(v)
            if not alive.any():
                break
            x = (self._tokens(layer, dz, dphi, yn) + c + self.pos.weight[t + 1])[:, None, :]
        raw = {k: torch.stack(v, 1) for k, v in out.items()}
        raw.update(e_vis=e_vis, z_axis=z_axis, phi_axis=phi_axis)
        return raw

    def _hits(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw sequences -> CSR hits at cell centres: cells outside the barrel dropped, a cell
        written twice summed once, energies rescaled to the sampled E_vis."""
        w = self.config.window
        layer, alive = raw["layer"], raw["alive"]
        b, t = layer.shape
        iz = torch.gather(raw["z_axis"], 1, layer).floor().long() + raw["dz"] - w
        iphi = torch.remainder(raw["phi_axis"].floor().long()[:, None] + raw["dphi"] - w, self.n_phi)
        ok = alive & (iz >= 0) & (iz < self.n_z)
        energy = torch.where(ok, raw["energy"], torch.zeros_like(raw["energy"]))
        energy = energy * (raw["e_vis"] / energy.sum(1).clamp(min=1e-12))[:, None]
        event = torch.arange(b, device=layer.device)[:, None].expand(b, t)
        key = ((event * self.n_layers + layer) * self.n_z + iz.clamp(0, self.n_z - 1)) * self.n_phi + iphi
        key, energy = key[ok], energy[ok]
        cells, where = torch.unique(key, return_inverse=True)  # sorted: grouped by event
        summed = torch.zeros(len(cells), dtype=energy.dtype, device=energy.device).index_add_(0, where, energy)
        iphi_c = cells % self.n_phi
        iz_c = (cells // self.n_phi) % self.n_z
        layer_c = (cells // (self.n_phi * self.n_z)) % self.n_layers
        ev = cells // (self.n_phi * self.n_z * self.n_layers)
        r = self.inner + (layer_c.double() + 0.5) * self.pitch
        phi = (iphi_c.double() + 0.5) * self.phi_cell
        z = (iz_c.double() + 0.5) * self.z_cell - self.half
        hits = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z, summed.double().clamp(min=0)], 1).float()
        offsets = torch.zeros(b + 1, dtype=torch.int64, device=layer.device)
        offsets[1:] = torch.cumsum(torch.bincount(ev, minlength=b), 0)
        return {"hits": hits, "offsets": offsets}

    @torch.no_grad()
    def sample(self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None,
               **kwargs: Any) -> dict[str, torch.Tensor]:
        """One shower per condition row as fired-cell hits (CSR); full cost always (one
        token per cell, with the key/value cache), so no cost knobs."""
        if kwargs:
            raise TypeError(f"cepc_transformer.sample() has no cost knobs, but got {sorted(kwargs)}")
        was_training = self.training
        self.eval()
        conditions = {k: v.to(self.bos.device) for k, v in conditions.items()}
        if len(conditions["energy"]) == 0:
            self.train(was_training)
            return {"hits": torch.zeros(0, 4), "offsets": torch.zeros(1, dtype=torch.int64)}
        out = self._hits(self._generate(conditions, generator))
        self.train(was_training)
        return out

    # ---- health ------------------------------------------------------------------------
    @torch.no_grad()
    def collapse_metrics(self) -> dict[str, float]:
        """Collapse diagnostics of a fixed probe sample (prepared conditions, fixed seed):
        the share of events identical to another (cell offsets), the share of cells that
        repeat a cell already in their event, and the spread of first cells relative to
        the training data's."""
        was_training = self.training
        self.eval()
        cond = self.prepared.probe_conditions
        conditions = dict(zip(("energy", "px", "py", "pz"), cond.unbind(1), strict=True))
        raw = self._generate(conditions, torch.Generator(device=cond.device).manual_seed(0))
        self.train(was_training)
        cells = torch.stack([raw["layer"], raw["dz"], raw["dphi"]], -1)  # (B, T, 3)
        alive = raw["alive"]
        patterns, repeated, written = [], 0, 0
        for i in range(len(cells)):
            mine = cells[i][alive[i]]
            patterns.append(tuple(mine.flatten().tolist()))
            written += len(mine)
            repeated += len(mine) - len(torch.unique(mine, dim=0)) if len(mine) else 0
        counts: dict[tuple, int] = {}
        for p in patterns:
            counts[p] = counts.get(p, 0) + 1
        duplicates = sum(counts[p] > 1 for p in patterns) / max(len(patterns), 1)
        spread = cells[:, 0].float().std(0).square().sum().sqrt() if len(cells) > 1 else torch.tensor(0.0)
        return {"duplicate_events": float(duplicates), "repeated_cells": repeated / max(written, 1),
                "first_cell_spread": float(spread / self.prepared.first_cell_spread.clamp(min=1e-6)),
                "cells_per_event": written / max(len(cells), 1)}

    def epoch_metrics(self, ctx: TrainContext) -> dict[str, float]:
        """The collapse detector; prunes (TrialPruned, with the reason) a collapsed model.

        The probe is sampled with a fixed seed from identical weights, so every rank gets
        the same numbers; they are averaged over ranks anyway before deciding."""
        if not hasattr(self.prepared, "probe_conditions"):
            return {}
        health = self.collapse_metrics()
        names = sorted(health)
        agreed = ctx.all_reduce_mean(torch.tensor([health[k] for k in names], dtype=torch.float64,
                                                  device=self.bos.device))
        health = dict(zip(names, (float(v) for v in agreed), strict=True))
        if self.config.collapse_check:
            reasons = []
            if health["duplicate_events"] > MAX_DUPLICATE_EVENTS:
                reasons.append(f"{health['duplicate_events']:.0%} of probe events identical")
            if health["repeated_cells"] > MAX_REPEATED_CELLS:
                reasons.append(f"{health['repeated_cells']:.0%} of generated cells repeat a cell of their event")
            if health["first_cell_spread"] < MIN_FIRST_CELL_SPREAD:
                reasons.append(f"first-cell spread {health['first_cell_spread']:.2f} of the data's")
            if reasons:
                raise TrialPruned("mode collapse: " + "; ".join(reasons))
        return health


def build(config: Config, detector: Any) -> CEPCTransformer:
    """The model for a CEPC ECAL detector; reads only its geometry."""
    return CEPCTransformer(config, detector.geometry)


__all__ = ["DETECTORS", "PHASE_PARAMS", "SAMPLING_PARAMS", "CEPCTransformer", "Config", "build"]
