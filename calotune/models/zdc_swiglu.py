"""ZDC SwiGLU generator: a conditional GAN with parallel ECAL and HCAL paths.

The design follows the ZDC group's slides (ZDC ML status update, Institute of Physics,
Academia Sinica, 2025-12-04; seed 000):

    conditions (log E, theta, phi) + noise z
        -> trunk MLP -> [optional MoE-FFN, top-k experts]
        -> per part (ECAL, HCAL), in parallel:
             mask head  (hit probability per cell)   -> A = low-rank projection
             value head (log-energy per cell)        -> B = low-rank projection
             sigma = sigmoid(low-rank projection of [mask, value])
             gate  = sigma * A + (1 - sigma) * B     -> one channel per cell
        -> hard hit mask, Bernoulli(p): most cells exactly 0
        -> energy conservation: cells rescaled so that sum(ECAL) + sum(HCAL) = f * E_inc

Losses (weights in Config): BCE of the mask against the real shower of the same
conditions, MSE of the value head on its hit cells, log-ratios of part and total
energies, and the adversarial term from a critic on (cell shares, energy fractions).

The slides' gate is a convex sigmoid blend of two projections; it is named after SwiGLU
(Shazeer 2020, arXiv 2002.05202), whose Swish(xW) * xV gating it adapts. The MoE-FFN is
the sparsely gated mixture of experts of Shazeer et al. 2017 (arXiv 1701.06538) with the
Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv 2101.03961).

The adversarial loss is the non-saturating GAN loss with an R1 penalty on real showers
(Mescheder et al. 2018, arXiv 1801.04406) rather than WGAN-GP (arXiv 1704.00028): R1 is
stable with one critic update per generator update, where WGAN-GP usually wants five,
and trials in a search run on a couple of CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calotune.models.base import Batch, GenerativeModel, TrainContext, bounded, check_fields

DETECTORS = ("zdc",)
#: A registered model can be fine-tuned (``train_phases: [train]`` with a ``base_model``)
#: under other loss weights and learning rates: none of them changes a weight's shape,
#: so the parent's weights are the starting point. The architecture is the parent's.
PHASE_PARAMS: dict[str, tuple[str, ...]] = {
    "train": ("lr_generator", "lr_critic", "critic_steps", "adv_loss_weight", "mask_loss_weight",
              "value_loss_weight", "energy_loss_weight", "r1_weight", "moe_aux_weight",
              "mask_straight_through", "mask_temperature", "dropout"),
}
#: Fields that act only under another field's value (read by calotune.spec_lint, which
#: warns about a space that searches them where they are ignored).
IGNORED_UNLESS: dict[str, dict[str, object]] = {
    "moe_experts": {"use_moe": True}, "moe_top_k": {"use_moe": True}, "moe_aux_weight": {"use_moe": True},
}

#: Cells are compared on u = log1p(cell / E_inc * CELL_SCALE): a typical ZDC hit
#: (tens of MeV for 100 GeV) lands near u ~ 1, and the tiny cells stay near 0.
CELL_SCALE = 1e4
#: The critic sees u = log1p(cell / event total * SHARE_SCALE): a shower of a few hundred
#: hits puts a typical hit near u ~ 1.
SHARE_SCALE = 1e3
#: Upper bound of the visible fraction f. A sampling calorimeter sees a few percent;
#: calibrated cells sum to ~1 with fluctuations; 2 leaves headroom for both.
MAX_VISIBLE_FRACTION = 2.0
#: Cap of the gated log-weight, so that expm1 never overflows (e^20 ~ 5e8 dynamic range).
MAX_LOG_WEIGHT = 20.0
#: Rows per chunk in sample(): an HCAL path holds (rows, 3600, low_rank) floats.
SAMPLE_CHUNK = 256


@dataclass
class Config:
    """Every tunable knob of the ZDC SwiGLU family (flat names, as search spaces use)."""

    noise_dim: int = bounded(16, gt=0)
    """Latent noise size; the only source of shower-to-shower variation besides the hit
    mask, so too small a value collapses fluctuations of the energy fraction."""
    hidden_width: int = bounded(128, gt=0)
    """Trunk width; also the input width of the per-cell heads, whose cost scales with
    hidden_width * n_cells (3600 HCAL cells dominate the step time)."""
    n_layers: int = bounded(2, gt=0)
    """Residual MLP blocks in the shared trunk; depth couples ECAL and HCAL features."""
    low_rank: int = bounded(8, gt=0)
    """SwiGLU gate channels per cell (the slides' low_rank=8); cost is linear in it."""
    use_moe: bool = False
    """Add a mixture-of-experts FFN after the trunk (slides: tested on ECAL only, no gain
    yet, so it is off by default and left for the search to decide)."""
    moe_experts: int = bounded(4, gt=0)
    """Number of experts in the MoE-FFN."""
    moe_top_k: int = bounded(2, gt=0)
    """Experts each event is routed to (the slides pick the top 2)."""
    moe_aux_weight: float = bounded(0.01, ge=0)
    """Weight of the load-balancing loss; without it the router tends to use one expert."""
    mask_loss_weight: float = bounded(0.5, ge=0)
    """BCE of hit probability vs real occupancy. The slides: too large makes the gate
    follow the mask and fire almost every cell; 0.5 with value 1.0 worked."""
    value_loss_weight: float = bounded(1.0, ge=0)
    """MSE of the value head's log-energy on real hit cells; constrains sigma's range."""
    energy_loss_weight: float = bounded(1.0, ge=0)
    """Squared log-ratio of generated vs real energy (same conditions), per part and in
    total; anchors the visible fraction f (imposed exactly by the energy-conservation
    layer) and the ECAL/HCAL split."""
    adv_loss_weight: float = bounded(1.0, ge=0)
    """Weight of the adversarial term; 0 turns the model into a pure regression (the
    critic is then never updated); the paired supervised losses alone pull every shower
    towards the per-condition average, so fluctuations shrink."""
    lr_generator: float = bounded(1e-3, gt=0)
    """Adam learning rate of the generator; high because a trial has only a few epochs."""
    lr_critic: float = bounded(1e-3, gt=0)
    """Adam learning rate of the critic."""
    critic_steps: int = bounded(1, gt=0)
    """Critic updates per generator update; 1 suffices with R1, each extra one costs
    about a generator forward pass plus a critic double backward."""
    r1_weight: float = bounded(1.0, ge=0)
    """R1 gradient penalty weight (gamma) on real showers; larger is smoother and slower
    to learn, too small lets the critic overpower the generator."""
    critic_width: int = bounded(128, gt=0)
    """Critic hidden width; its first layer sees every cell."""
    mask_straight_through: float = bounded(0.0, ge=0, le=1)
    """Scale of the adversarial gradient that reaches the hard hit mask (straight-through
    relaxed Bernoulli). 0: which cells fire is learned from the BCE alone, which keeps
    the occupancy right; 1: the critic also shapes it, but in few-epoch runs on ZDC data
    it drove the occupancy from 10 % to under 1 %. Bounded to [0, 1]: between no and the
    full straight-through gradient."""
    mask_temperature: float = bounded(0.5, gt=0)
    """Temperature of the relaxed Bernoulli behind the straight-through gradient; the
    forward pass is hard (exact zeros) at every temperature."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout in the trunk blocks; rarely useful for a few-epoch GAN."""

    def __post_init__(self) -> None:
        """Refuse a configuration the model cannot train, naming the rule and the value.

        Per-field types and bounds are declared on the fields above (``bounded``), so that
        calotune.spec can check a whole search space against them before Ray starts;
        only the rule between fields is written out here.
        """
        check_fields(self)
        # MoEFFN.route takes logits.topk(moe_top_k) over moe_experts experts.
        if self.moe_top_k > self.moe_experts:
            raise ValueError(
                "moe_top_k <= moe_experts must hold, but got "
                f"moe_top_k={self.moe_top_k}, moe_experts={self.moe_experts}"
            )


class SwiGLUGate(nn.Module):
    """sigma * A + (1 - sigma) * B per cell, then one output channel (seed 000 slides).

    Per cell: A = proj_a(mask), B = proj_b(value) (rank channels each), sigma =
    sigmoid(proj_gate([mask, value]) + cell bias), out = proj_out(mix(A, B, sigma)). The
    same channel mixing serves every cell (a kernel-1 convolution); the learned per-cell
    gate bias lets the blend depend on position (the slides found the gate helps HCAL,
    whose depth profile varies strongly).

    The (B, rank, n_cells) tensors dominate a training step (3600 HCAL cells), so forward
    folds proj_out into the other projections, which is exact because proj_out is linear:
        out = sum_r wo_r B_r + bo  +  sum_r sigma_r * wo_r (A_r - B_r)
    and keeps cells as the contiguous last axis. That halves the time of the literal form.
    """

    def __init__(self, rank: int, n_cells: int | None = None) -> None:
        super().__init__()
        self.proj_a = nn.Linear(1, rank)  # mask -> A
        self.proj_b = nn.Linear(1, rank)  # value -> B
        self.proj_gate = nn.Linear(2, rank)  # [mask, value] -> sigma logits
        self.cell_gate_bias = nn.Parameter(torch.zeros(rank, n_cells)) if n_cells else None
        self.proj_out = nn.Linear(rank, 1)

    @staticmethod
    def mix(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The gate itself: sigma=1 gives A (mask only), sigma=0 gives B (value only)."""
        return sigma * a + (1 - sigma) * b

    def forward(
        self, mask: torch.Tensor, value: torch.Tensor, sigma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, n) mask and value maps -> (B, n); ``sigma`` (broadcastable to (B, rank, n),
        e.g. a float or shape (rank, 1)) replaces the learned gate."""
        m, v = mask[:, None, :], value[:, None, :]  # (B, 1, n): channels first
        wo = self.proj_out.weight.T  # (r, 1)
        wa, wb = self.proj_a.weight * wo, self.proj_b.weight * wo  # (r, 1), proj_out folded in
        if sigma is None:
            bias = self.proj_gate.bias[:, None]  # (r, 1)
            if self.cell_gate_bias is not None:
                bias = bias + self.cell_gate_bias  # (r, n)
            wg = self.proj_gate.weight  # (r, 2)
            logits = torch.addcmul(bias, m, wg[:, :1]).addcmul_(v, wg[:, 1:])  # (B, r, n)
            sigma = torch.sigmoid(logits)
        diff_bias = wo * (self.proj_a.bias - self.proj_b.bias)[:, None]  # (r, 1)
        diff = torch.addcmul(diff_bias, m, wa).addcmul_(v, -wb)  # (B, r, n): wo * (A - B)
        base = v[:, 0] * wb.sum() + self.proj_b.bias @ wo[:, 0] + self.proj_out.bias  # (B, n)
        return base + (sigma * diff).sum(1)


class MoEFFN(nn.Module):
    """Top-k mixture of experts; each event goes through exactly k expert MLPs."""

    def __init__(self, width: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(width, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
            for _ in range(n_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights (B, E) (renormalised over the top k), routing mask (B, E), aux loss."""
        logits = self.router(x)  # (B, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (B, k)
        weights = torch.zeros_like(logits).scatter(1, top_idx, top_logits.softmax(dim=-1))
        routed = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)
        # Switch-Transformer balance: E * sum_e (share of routes to e) * (mean prob of e);
        # equals 1 when the load is uniform.
        share = routed.float().mean(0) / self.top_k  # (E,)
        aux = logits.shape[1] * (share * logits.softmax(dim=-1).mean(0)).sum()
        return weights, routed, aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, routed, aux = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = routed[:, e].nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_add(0, rows, weights[rows, e, None] * expert(x[rows]))
        return out, aux


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, 2 * width),
            nn.SiLU(),
            nn.Linear(2 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class PartPath(nn.Module):
    """One calorimeter part (ECAL or HCAL): mask head, value head, SwiGLU gate.

    Each head has one extra output column, a per-event offset shared by all cells: how
    many cells fire and how hot they are both grow with energy, and a shared offset
    learns that from every cell's gradient instead of once per cell.
    """

    def __init__(self, width: int, n_cells: int, rank: int) -> None:
        super().__init__()
        self.mask_head = nn.Linear(width, n_cells + 1)
        self.value_head = nn.Linear(width, n_cells + 1)
        nn.init.constant_(self.mask_head.bias, -1.0)  # cell + offset: logit -2, p ~ 0.12
        self.gate = SwiGLUGate(rank, n_cells)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H) -> mask logits, value u >= 0, gated log-weight >= 0, each (B, n)."""
        mask = self.mask_head(h)  # (B, n + 1)
        mask_logit = mask[:, :-1] + mask[:, -1:]
        value = self.value_head(h)
        value = F.softplus(value[:, :-1] + value[:, -1:])
        gated = self.gate(torch.sigmoid(mask_logit), value)
        return mask_logit, value, F.softplus(gated).clamp(max=MAX_LOG_WEIGHT)


class ZDCSwiGLU(GenerativeModel):
    """Conditional ZDC shower generator (ECAL + HCAL) with its critic and train step."""

    def __init__(self, config: Config, part_sizes: dict[str, int], conditions: tuple[str, ...]):
        super().__init__()
        if not part_sizes:
            raise ValueError("the detector must have at least one part, but part_sizes={}")
        if "energy" not in conditions:
            raise ValueError(f"conditions must include 'energy', but got {conditions}")
        self.config = config
        self.part_sizes = dict(part_sizes)
        self.condition_names = tuple(conditions)
        n_cond = sum(1 if name == "energy" else 2 for name in conditions)
        n_total = sum(part_sizes.values())
        width = config.hidden_width

        self.input = nn.Linear(n_cond + config.noise_dim, width)
        self.blocks = nn.ModuleList(Block(width, config.dropout) for _ in range(config.n_layers))
        self.moe = (
            MoEFFN(width, config.moe_experts, config.moe_top_k) if config.use_moe else None
        )
        self.norm = nn.LayerNorm(width)
        self.fraction_head = nn.Linear(width, 1)
        # f starts at 0.8: stored cells are corrected for the sampling fraction (ZDC
        # synthetic data, CaloChallenge), so visible totals sit near E_inc; raw deposits
        # (~0.04) are reachable but slower to learn.
        nn.init.constant_(self.fraction_head.bias, math.log(0.4 / 0.6))
        self.paths = nn.ModuleDict(
            {part: PartPath(width, n, config.low_rank) for part, n in part_sizes.items()}
        )
        n_summary = len(part_sizes) + 1  # log energy fraction per part and in total
        self.critic = nn.Sequential(
            nn.Linear(n_total + n_summary + n_cond, config.critic_width),
            nn.LeakyReLU(0.2),
            nn.Linear(config.critic_width, config.critic_width),
            nn.LeakyReLU(0.2),
            nn.Linear(config.critic_width, 1),
        )

    # ---- conditioning -------------------------------------------------------------
    def condition_features(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_cond): log10 E centred on 10 GeV; sin and cos of every other condition,
        which are angles (ZDC: theta, phi).

        sin/cos keep angles continuous across their wrap-around and bounded whatever
        convention (radians in [-pi, pi] or [0, 2 pi]) the data uses.
        """
        feats = []
        for name in self.condition_names:
            x = conditions[name].float()
            if name == "energy":
                feats.append((torch.log10(x.clamp(min=1.0)) - 4.0) / 1.5)  # 300 GeV -> ~1
            else:
                feats += [torch.sin(x), torch.cos(x)]
        return torch.stack(feats, dim=1)

    # ---- generator ----------------------------------------------------------------
    def _generate(
        self, feats: torch.Tensor, energy: torch.Tensor, z: torch.Tensor, logistic: torch.Tensor
    ) -> dict[str, Any]:
        """Showers from conditions and noise; ``logistic`` (B, n_total) drives the mask.

        hard = 1[logit + L > 0] with L ~ Logistic(0, 1) is exactly Bernoulli(sigmoid(logit));
        a straight-through estimator, scaled by ``mask_straight_through``, passes the
        gradient of the relaxed sample sigmoid((logit + L) / temperature) back to the mask.
        """
        h = self.input(torch.cat([feats, z], dim=1))  # (B, H)
        for block in self.blocks:
            h = block(h)
        aux = h.new_zeros(())
        if self.moe is not None:
            moe_out, aux = self.moe(h)
            h = h + moe_out
        h = self.norm(h)
        fraction = MAX_VISIBLE_FRACTION * torch.sigmoid(self.fraction_head(h)).squeeze(1)  # (B,)

        logits, values, log_ws = zip(*(path(h) for path in self.paths.values()), strict=True)
        logit = torch.cat(logits, dim=1)  # (B, n_total)
        soft = torch.sigmoid((logit + logistic) / self.config.mask_temperature)
        hard = (logit + logistic > 0).float()
        st = self.config.mask_straight_through
        mask = hard + st * (soft - soft.detach())  # forward: exact 0/1; backward: relaxed
        dense = torch.expm1(torch.cat(log_ws, dim=1))  # (B, n_total), >= 0
        # An event whose mask dropped every cell keeps its most probable cell, so that
        # f * E_inc still has somewhere to go.
        empty = (dense * hard).sum(1, keepdim=True) <= 0
        fallback = F.one_hot(logit.argmax(1), logit.shape[1]).float()
        weight = torch.where(empty, fallback, dense * mask)
        total = fraction * energy  # (B,) MeV, imposed exactly below
        cells = weight / weight.sum(1, keepdim=True) * total[:, None]
        split = list(self.part_sizes.values())
        # Part energies for the energy loss, with the mask and f held fixed: the part terms
        # then move only the ECAL/HCAL split (f has its own total term), and which cells
        # fire is left to the mask and adversarial losses (through the mask, the energy
        # gradient fights the BCE; through f, an ECAL that is often empty drags f down).
        fixed = torch.where(empty, fallback, dense * hard)
        part_share = torch.stack([w.sum(1) for w in fixed.split(split, dim=1)], dim=1)
        part_energy = part_share / fixed.sum(1, keepdim=True) * total.detach()[:, None]
        return {
            "cells": dict(zip(self.part_sizes, cells.split(split, dim=1), strict=True)),
            "part_energy": part_energy,
            "mask_logit": logit,
            "value": torch.cat(values, dim=1),
            "fraction": fraction,
            "aux": aux,
        }

    def _noise(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent z (n, noise_dim) and logistic mask noise (n, n_total) on the model's device."""
        device = self.input.weight.device
        draw_on = generator.device if generator is not None else device
        z = torch.randn(n, self.config.noise_dim, generator=generator, device=draw_on)
        u = torch.rand(n, sum(self.part_sizes.values()), generator=generator, device=draw_on)
        u = u.clamp(1e-6, 1 - 1e-6)
        return z.to(device), torch.log(u / (1 - u)).to(device)

    @torch.no_grad()
    def sample(
        self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """One shower per row, MeV, >= 0, most cells exactly 0; chunked to bound memory.

        One forward pass per shower: there is no cheaper setting, so no cost knob.
        """
        if kwargs:
            raise TypeError(f"zdc_swiglu.sample() has no cost knobs, but got {sorted(kwargs)}")
        was_training = self.training
        self.eval()
        device = self.input.weight.device
        conditions = {k: v.to(device) for k, v in conditions.items()}
        energy = conditions["energy"].float()
        z, logistic = self._noise(len(energy), generator)  # all noise first: chunk-invariant
        feats = self.condition_features(conditions)
        out: dict[str, list[torch.Tensor]] = {part: [] for part in self.part_sizes}
        for i in range(0, len(energy), SAMPLE_CHUNK):
            sl = slice(i, i + SAMPLE_CHUNK)
            cells = self._generate(feats[sl], energy[sl], z[sl], logistic[sl])["cells"]
            for part, c in cells.items():
                out[part].append(c)
        self.train(was_training)
        empty = {p: torch.zeros(0, n, device=device) for p, n in self.part_sizes.items()}
        return {p: torch.cat(c) if c else empty[p] for p, c in out.items()}

    # ---- critic -------------------------------------------------------------------
    def _critic_input(self, cells: dict[str, torch.Tensor], energy: torch.Tensor) -> torch.Tensor:
        """(B, n_total + n_parts + 1): log1p-scaled shares of the event's total per cell,
        then log energy fractions (per part and in total) of E_inc.

        Shares mirror the generator's shape x total factorisation: the critic's verdict on
        the shape does not reach f, so f answers only to the totals, as in Calo-VQ's
        voxels / E_inc / R preprocessing (arXiv 2405.06605)."""
        e_inc = energy.clamp(min=1.0)[:, None]  # (B, 1)
        sums = torch.stack([c.sum(1) for c in cells.values()], dim=1)  # (B, parts) MeV
        total = sums.sum(1, keepdim=True).clamp(min=1e-6 * e_inc)  # (B, 1)
        shares = [torch.log1p(c / total * SHARE_SCALE) for c in cells.values()]
        fractions = torch.cat([sums, sums.sum(1, keepdim=True)], dim=1) / e_inc
        return torch.cat([*shares, torch.log(fractions + 1e-4)], dim=1)

    def _critic(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([x, feats], dim=1)).squeeze(1)  # (B,) logits

    # ---- training -----------------------------------------------------------------
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """[critic, generator]; betas (0.5, 0.9) damp the momentum that makes GANs cycle."""
        critic = list(self.critic.parameters())
        critic_ids = {id(p) for p in critic}
        generator = [p for p in self.parameters() if id(p) not in critic_ids]
        return [
            torch.optim.Adam(critic, lr=self.config.lr_critic, betas=(0.5, 0.9)),
            torch.optim.Adam(generator, lr=self.config.lr_generator, betas=(0.5, 0.9)),
        ]

    def train_step(
        self, batch: Batch, optimizers: list[torch.optim.Optimizer], ctx: TrainContext
    ) -> dict[str, float]:
        """One critic update (or ``critic_steps``) then one generator update; a GAN has
        one phase, no preparation and no state besides its weights and optimisers."""
        step = ctx.step
        cfg = self.config
        opt_critic, opt_gen = optimizers
        conditions, real = batch["conditions"], batch["cells"]
        energy = conditions["energy"].float()
        feats = self.condition_features(conditions)
        real = {part: real[part].float() for part in self.part_sizes}
        real_x = self._critic_input(real, energy)
        n = len(energy)

        # One generator forward serves the first critic update (detached) and the generator
        # update, as in the DCGAN reference loop; extra critic updates draw fresh fakes.
        out = self._generate(feats, energy, *self._noise(n, None))
        loss_critic = r1 = energy.new_zeros(())
        if cfg.adv_loss_weight > 0:
            for k in range(cfg.critic_steps):
                if k == 0:
                    fake = {part: c.detach() for part, c in out["cells"].items()}
                else:
                    with torch.no_grad():
                        fake = self._generate(feats, energy, *self._noise(n, None))["cells"]
                real_in = real_x.detach().requires_grad_(True)
                d_real = self._critic(real_in, feats)
                d_fake = self._critic(self._critic_input(fake, energy), feats)
                (grad,) = torch.autograd.grad(d_real.sum(), real_in, create_graph=True)
                r1 = grad.square().sum(1).mean()  # R1: E_real |grad_x D(x)|^2
                loss_critic = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
                step(loss_critic + 0.5 * cfg.r1_weight * r1, opt_critic)

        real_cells = torch.cat(list(real.values()), dim=1)  # (B, n_total)
        hit = (real_cells > 0).float()
        loss_mask = F.binary_cross_entropy_with_logits(out["mask_logit"], hit)
        real_u = torch.log1p(real_cells / energy.clamp(min=1.0)[:, None] * CELL_SCALE)
        loss_value = ((out["value"] - real_u).square() * hit).sum() / hit.sum().clamp(min=1)
        # Squared log-ratios of generated vs real energy, per part and in total: the total
        # sets f, the parts set the ECAL/HCAL split the ZDC group checks (HCAL / total).
        real_sums = [c.sum(1) for c in real.values()]
        gen_e = torch.cat([out["part_energy"], (out["fraction"] * energy)[:, None]], dim=1)
        real_e = torch.stack([*real_sums, real_cells.sum(1)], dim=1)
        delta = 1e-3 * energy.clamp(min=1.0)[:, None]  # keeps the log finite for empty parts
        loss_energy = (torch.log(gen_e + delta) - torch.log(real_e + delta)).square().mean()
        loss_adv = energy.new_zeros(())
        if cfg.adv_loss_weight > 0:
            self.critic.requires_grad_(False)  # no critic weight gradients in this update
            loss_adv = F.softplus(-self._critic(self._critic_input(out["cells"], energy), feats))
            loss_adv = loss_adv.mean()
            self.critic.requires_grad_(True)
        loss_gen = (
            cfg.adv_loss_weight * loss_adv
            + cfg.mask_loss_weight * loss_mask
            + cfg.value_loss_weight * loss_value
            + cfg.energy_loss_weight * loss_energy
            + cfg.moe_aux_weight * out["aux"]
        )
        step(loss_gen, opt_gen)
        return {
            "loss_critic": loss_critic.detach(),
            "loss_r1": r1.detach(),
            "loss_generator": loss_gen.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_mask": loss_mask.detach(),
            "loss_value": loss_value.detach(),
            "loss_energy": loss_energy.detach(),
            "loss_moe_aux": out["aux"].detach(),
            "visible_fraction": out["fraction"].detach().mean(),
            "occupancy": sum((c > 0).sum() for c in out["cells"].values()) / hit.numel(),
        }


def build(config: Config, detector: Any) -> ZDCSwiGLU:
    """The model for a detector; only ``part_sizes`` and ``conditions`` are read."""
    return ZDCSwiGLU(config, dict(detector.part_sizes), tuple(detector.conditions))


__all__ = ["DETECTORS", "Config", "MoEFFN", "SwiGLUGate", "ZDCSwiGLU", "build"]
