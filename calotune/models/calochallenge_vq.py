"""Calo-VQ: a vector-quantised autoencoder and a GPT prior over its codes (CaloChallenge).

Seed 002 (Q. Liu et al., "Latent generative model for calorimeter fast simulation";
Calo-VQ, arXiv 2405.06605) is a two-step latent model, trained here as two phases of one
trial:

    step 1, phase "autoencoder" (not scoreable: it cannot sample on its own)
        shower x (MeV), E_inc
          -> shares u = x / E_tot (sum to 1), v = standardised log(u + floor)
          -> MLP encoder -> n_tokens vectors of embed_dim -> nearest codebook entries
          -> MLP decoder -> softmax over voxels = u_hat
        losses: pixel MSE on v, layer energy shares, shower centre and width per layer
        (the seed's "physics-aware" terms), commitment beta |z_e - sg[e]|^2 (arXiv
        1711.00937), optional adversarial term from a discriminator (VQGAN, arXiv
        2012.09841) with its adaptive weight, from ``disc_start_epoch`` of the phase on.
    step 2, phase "prior" (scored)
        a GPT (minGPT layout; causal self-attention, arXiv 1706.03762) conditioned on
        log E_inc generates [R tokens..., code tokens...]: R = E_tot / E_inc is
        discretised into ``r_tokens`` leading tokens of ``r_levels`` levels each (Calo-VQ
        predicts R as 10 one-bit tokens; 2 tokens of 32 levels are the same 10 bits in
        fewer autoregressive steps), then the codes of the frozen encoder.
    sampling: GPT tokens (temperature, top-k) -> R and codes -> decoder softmax -> u_hat
        -> showers = u_hat * R * E_inc, with voxels under the readout threshold zeroed (the
        data are zero there, arXiv 2410.21611) and the rest rescaled to keep R * E_inc.

The softmax normalisation (voxels / E_inc, then / R) is the seed's: the decoder only
describes where energy goes, the prior how much there is, so a shower's total is never
the sum of hundreds of independently wrong voxels.

Quantiser: the codebook is updated by exponential moving averages of the assigned
encoder outputs (arXiv 1711.00937 appendix; VQ-VAE-2, arXiv 1906.00446) rather than by a
codebook loss, because (1) its speed does not depend on the learning rate or the
adversarial loss scale, which a search varies, (2) under DDP the assignment statistics are
averaged over ranks with ``ctx.all_reduce_mean`` so every rank holds the same codebook
without gradient all-reduces of a sparse update, and (3) codes left unused for a whole
epoch are restarted on random encoder outputs (Jukebox, arXiv 2005.00341; SoundStream,
arXiv 2107.03312), the standard cure for the codebook collapse that short few-epoch trials
are prone to. Usage (perplexity, dead codes) is reported every epoch; a codebook whose
usage falls under ``min_code_usage`` ends the trial as pruned (``TrialPruned``), not as a
low score.

Encoder and decoder are fully connected, as Calo-VQ uses for the small irregular dataset 1
geometries; dataset 2 uses the same MLPs (Calo-VQ's cylindrical convolutions and FFT
resampling for datasets 2 and 3 are left out: a search trial runs on a couple of CPU cores).

Searches on a registered model: :data:`SAMPLING_PARAMS` (temperature, top-k) change only
``sample``; :data:`PHASE_PARAMS` name the fields of each phase, and :meth:`VQModel.inherit`
keeps the parent's autoencoder, codebook and discriminator while the prior starts fresh
(its width and depth may differ from the parent's).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calotune.models.base import (
    Batch,
    GenerativeModel,
    Phase,
    TrainContext,
    TrialPruned,
    bounded,
    check_fields,
)

log = logging.getLogger(__name__)

DETECTORS = ("calochallenge-1-photons", "calochallenge-1-pions", "calochallenge-2")

#: Config fields that change only how ``sample`` runs, never a parameter's shape: a search
#: on a registered model may vary them without retraining.
SAMPLING_PARAMS: tuple[str, ...] = ("temperature", "top_k")

#: Config fields that change only one phase's modules or training.
PHASE_PARAMS: dict[str, tuple[str, ...]] = {
    "autoencoder": (
        "n_tokens", "codebook_size", "embed_dim", "beta", "ema_decay", "restart_dead_codes",
        "min_code_usage", "hidden_width", "n_layers", "lr_autoencoder", "pixel_weight", "kl_weight",
        "layer_weight", "centre_weight", "width_weight", "disc_weight", "disc_start_epoch",
        "disc_width", "lr_disc", "adaptive_disc_weight",
    ),
    "prior": ("gpt_layers", "gpt_heads", "gpt_width", "gpt_dropout", "lr_prior", "r_tokens",
              "r_levels"),
}

#: Per-voxel standard deviations of the log shares are floored here (log units): a voxel
#: that is always empty has std 0 and would otherwise dominate the pixel loss.
STD_FLOOR = 0.5
#: R = E_tot / E_inc is quantised on [min R - margin, max R + margin] of the training split,
#: margin = this fraction of the range, so generated R may lie slightly outside the data's.
R_MARGIN = 0.05
#: The log floor of the shares is half the smallest non-zero share of the training split
#: (the data are zero below the readout threshold), within these bounds.
FLOOR_BOUNDS = (1e-12, 1e-4)
#: Events per chunk in ``prepare`` (reads cells through ``batch_arrays`` only).
PREPARE_CHUNK = 4096


@dataclass
class Config:
    """Every tunable knob of the Calo-VQ family (flat names, as search spaces use).

    Defaults follow the public Calo-VQ settings where they exist (codebook 1024, 32 latent
    tokens for dataset 1 photons, beta 0.25, discriminator weight 0.1, a 2-layer 2-head
    64-wide GPT, R as 10 bits) and train a sane model in a few CPU epochs otherwise.
    """

    # ---- step 1: autoencoder and quantiser --------------------------------------------
    n_tokens: int = bounded(32, gt=0)
    """Latent tokens per shower (Calo-VQ: 32 for dataset 1 photons). More tokens keep more
    shower detail (the seed: larger latents score better against a classifier) and make
    every sampled shower cost one more autoregressive GPT step."""
    codebook_size: int = bounded(1024, ge=2)
    """Codebook entries (Calo-VQ: 1024)."""
    embed_dim: int = bounded(256, gt=0)
    """Width of a code vector (Calo-VQ: 256 for datasets 1 and 2, 192 for 3); the
    nearest-code search costs n_tokens * codebook_size * embed_dim per shower."""
    beta: float = bounded(0.25, ge=0)
    """Commitment weight: pulls encoder outputs towards their codes (arXiv 1711.00937)."""
    ema_decay: float = bounded(0.99, ge=0, lt=1)
    """Decay of the codebook's moving averages; lower follows the encoder faster."""
    restart_dead_codes: bool = True
    """Move codes no training batch used in an autoencoder epoch onto random encoder
    outputs for the next epoch (arXiv 2005.00341)."""
    min_code_usage: float = bounded(0.01, ge=0, le=1)
    """Fraction of the codebook an epoch's training batches must use; below it the
    codebook has collapsed and the trial is pruned (its samples would be a few templates)."""
    hidden_width: int = bounded(256, gt=0)
    """Width of the encoder and decoder MLPs (fully connected, as Calo-VQ on dataset 1)."""
    n_layers: int = bounded(2, gt=0)
    """Hidden layers in each of the encoder and decoder."""
    lr_autoencoder: float = bounded(1e-3, gt=0)
    """Adam learning rate of encoder and decoder; Calo-VQ trains for days at 2e-6 to 3e-6,
    a trial has a few epochs."""
    pixel_weight: float = bounded(1.0, ge=0)
    """MSE of the standardised log shares per voxel (Calo-VQ: pixel weight 1). Alone it
    pulls each voxel towards the geometric mean of what its code stands for, which
    undershoots fluctuating tails: showers come out too narrow (see kl_weight)."""
    kl_weight: float = bounded(1.0, ge=0)
    """KL divergence of the decoded shares from the true ones, sum_i u_i log(u_i / u_hat_i):
    the multinomial likelihood of the energy among voxels, whose optimum is the arithmetic
    mean share, so energy-weighted features (centres, widths) are unbiased."""
    layer_weight: float = bounded(1.0, ge=0)
    """L1 of the energy shares per layer: the layer energies are the seed's best-modelled
    feature and the first the CaloChallenge evaluation histograms."""
    centre_weight: float = bounded(0.1, ge=0)
    """Difference of the shower centres in eta and phi per layer, in Moliere radii
    (Calo-VQ: 0.1)."""
    width_weight: float = bounded(0.1, ge=0)
    """Difference of the shower widths in eta and phi per layer, in Moliere radii
    (Calo-VQ: 0.1)."""
    disc_weight: float = bounded(0.1, ge=0)
    """Weight of the adversarial loss (VQGAN; Calo-VQ: 0.1-0.8); 0 trains a plain VQ-VAE
    (the discriminator is then never updated)."""
    disc_start_epoch: int = bounded(1, ge=0)
    """Epoch of the autoencoder phase (0-based) from which the adversarial loss is on:
    VQGAN starts it late, once reconstructions are close enough for its gradient to help."""
    disc_width: int = bounded(128, gt=0)
    """Hidden width of the MLP discriminator."""
    lr_disc: float = bounded(2e-4, gt=0)
    """Adam learning rate of the discriminator."""
    adaptive_disc_weight: bool = True
    """Scale the adversarial gradient at the decoder's last layer to the reconstruction
    gradient's norm (VQGAN's adaptive weight, arXiv 2012.09841; the seed's "adaptive
    weight"); off: the fixed disc_weight alone."""

    # ---- step 2: GPT prior --------------------------------------------------------------
    gpt_layers: int = bounded(2, gt=0)
    """Transformer blocks of the prior (Calo-VQ: 2)."""
    gpt_heads: int = bounded(2, gt=0)
    """Attention heads (Calo-VQ: 2); must divide gpt_width."""
    gpt_width: int = bounded(64, gt=0)
    """Prior width (Calo-VQ: 64 for datasets 1 and 2). Sampling time per shower grows with
    it and with the number of tokens: this is the knob of the speed objective."""
    gpt_dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout in the prior; rarely useful in a few epochs."""
    lr_prior: float = bounded(2e-3, gt=0)
    """Adam learning rate of the prior."""
    r_tokens: int = bounded(2, gt=0)
    """Leading tokens that encode R = E_tot / E_inc, most significant first."""
    r_levels: int = bounded(32, ge=2)
    """Levels per R token; R resolution = range / r_levels ** r_tokens (32^2 = 10 bits)."""

    # ---- sampling -----------------------------------------------------------------------
    temperature: float = bounded(1.0, gt=0)
    """Softmax temperature of the prior's tokens; < 1 sharpens (fewer odd showers, less
    spread), > 1 flattens."""
    top_k: int = bounded(0, ge=0)
    """Sample each token among its k most likely values only; 0 keeps all."""

    # ---- schedule -----------------------------------------------------------------------
    autoencoder_share: float = bounded(0.5, gt=0, lt=1)
    """Share of a trial's epochs spent on step 1; the rest trains the prior."""

    def __post_init__(self) -> None:
        """Refuse a configuration the model cannot build, naming the rule and the values.

        Per-field types and bounds are declared on the fields above (``bounded``), so that
        calotune.spec checks a whole search space before Ray starts; only the rules between
        fields are written out here.
        """
        check_fields(self)
        if self.gpt_width % self.gpt_heads:
            raise ValueError("gpt_width % gpt_heads == 0 must hold (heads split the width), but got "
                             f"gpt_width={self.gpt_width}, gpt_heads={self.gpt_heads}")
        if self.top_k > self.codebook_size:
            raise ValueError("top_k <= codebook_size must hold, but got "
                             f"top_k={self.top_k}, codebook_size={self.codebook_size}")
        if self.r_levels ** self.r_tokens > 2**24:
            raise ValueError("r_levels ** r_tokens <= 2**24 must hold (R is decoded in float32), "
                             f"but got r_levels={self.r_levels}, r_tokens={self.r_tokens}")


# ---- step 1 ---------------------------------------------------------------------------
def _mlp(n_in: int, width: int, n_out: int, n_layers: int) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU, ``n_layers`` times, then a linear output layer."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.LayerNorm(width), nn.SiLU()]
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class EMAQuantizer(nn.Module):
    """Nearest-neighbour codebook updated by moving averages, with usage bookkeeping.

    Buffers (saved with the model): ``codebook`` (K, D), ``ema_count`` (K,) and
    ``ema_sum`` (K, D). ``epoch_counts`` (K,) counts this rank's assignments since the
    last :meth:`VQModel.epoch_metrics` and is not saved: it is reset every epoch.
    """

    def __init__(self, size: int, dim: int, decay: float) -> None:
        super().__init__()
        self.size, self.dim, self.decay = size, dim, decay
        # Encoder outputs are layer-normalised (mean 0, variance 1 per token), so codes
        # drawn from N(0, 1) start at the same scale and every code is someone's nearest.
        codebook = torch.randn(size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("epoch_counts", torch.zeros(size), persistent=False)

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) index of the nearest code (squared Euclidean distance)."""
        flat = z.reshape(-1, self.dim)
        dist = (flat.square().sum(1, keepdim=True) - 2 * flat @ self.codebook.T
                + self.codebook.square().sum(1))
        return dist.argmin(1).reshape(z.shape[:-1])

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) code indices -> (..., D) code vectors."""
        return F.embedding(idx, self.codebook)

    @torch.no_grad()
    def count(self, idx: torch.Tensor) -> None:
        """Add assignments to this epoch's usage counts."""
        self.epoch_counts += torch.bincount(idx.reshape(-1), minlength=self.size).to(self.epoch_counts)

    @torch.no_grad()
    def update(self, z: torch.Tensor, idx: torch.Tensor, reduce: Any) -> None:
        """One EMA step towards the mean of the encoder outputs assigned to each code,
        from the statistics of every rank (``reduce`` = ``ctx.all_reduce_mean``)."""
        flat, ids = z.detach().reshape(-1, self.dim), idx.reshape(-1)
        stats = torch.zeros(self.size, self.dim + 1, device=flat.device, dtype=flat.dtype)
        stats[:, 0] = torch.bincount(ids, minlength=self.size).to(flat.dtype)
        stats[:, 1:].index_add_(0, ids, flat)
        stats = reduce(stats)  # one collective: counts and sums together
        self.ema_count.mul_(self.decay).add_(stats[:, 0], alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
        # Laplace smoothing keeps an unused code's count positive (arXiv 1906.00446).
        n, eps = self.ema_count.sum(), 1e-5
        smoothed = (self.ema_count + eps) / (n + self.size * eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, z: torch.Tensor, ctx: TrainContext) -> None:
        """Put the ``dead`` codes on random encoder outputs of rank 0's batch.

        ``dead`` comes from rank-averaged counts, so it is the same on every rank; rank 0's
        picks reach the others through ``all_reduce_mean`` (the others contribute zeros),
        so the codebooks stay identical without a broadcast in the training context.
        """
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat = z.detach().reshape(-1, self.dim)
        picks = flat[torch.randint(len(flat), (n_dead,), device=flat.device)]
        if ctx.world_size > 1:
            picks = ctx.all_reduce_mean(picks * ctx.world_size if ctx.rank == 0 else torch.zeros_like(picks))
        self.codebook[dead] = picks
        self.ema_sum[dead] = picks
        self.ema_count[dead] = 1.0


class Geometry(nn.Module):
    """Voxel coordinates and layer membership for the physics-aware losses.

    Non-persistent buffers: derived from the detector, they move with the model but are
    not weights.
    """

    def __init__(self, detector: Any) -> None:
        super().__init__()
        binning = detector.binning
        n_voxels, n_layers = binning.n_voxels, binning.n_layers
        member = np.zeros((n_voxels, n_layers), np.float32)
        for i in range(n_layers):
            member[binning.layer_slice(i), i] = 1.0
        xy = np.asarray(detector.cell_centres()["showers"][:, :2], np.float64)  # eta, phi (mm)
        coords = np.column_stack([xy, np.hypot(xy[:, 0], xy[:, 1])]).astype(np.float32)
        scale = float(getattr(detector.geometry, "moliere_radius_mm", 10.0))
        self.register_buffer("member", torch.tensor(member), persistent=False)  # (V, L)
        # (V, 3): eta, phi, r in Moliere radii, the coordinates the challenge's centres and
        # widths use
        self.register_buffer("xy", torch.tensor(coords / scale), persistent=False)

    def features(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shares (B, V) -> layer shares (B, L), centres (B, L, 3), widths (B, L, 3)."""
        layer = u @ self.member  # (B, L)
        denom = layer[:, :, None] + 1e-12
        mean = torch.einsum("bv,vl,vc->blc", u, self.member, self.xy) / denom
        mean2 = torch.einsum("bv,vl,vc->blc", u, self.member, self.xy.square()) / denom
        # + 1e-4 R_M^2 keeps the square root differentiable for one-voxel layers
        width = (mean2 - mean.square()).clamp(min=0).add(1e-4).sqrt()
        return layer, mean, width


# ---- step 2 ---------------------------------------------------------------------------
class CausalBlock(nn.Module):
    """Pre-norm transformer block (minGPT layout) with an optional key/value cache."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, S, W) -> (B, S, W) and the keys/values so far; with ``cache`` the S new
        positions attend to every cached one (generation), without it causally."""
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=2)
        q, k, v = (t.view(b, s, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and s > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.ln2(x)), (k, v)


class PriorGPT(nn.Module):
    """GPT over [R tokens, code tokens], conditioned on log E_inc through its first position.

    One vocabulary: codes 0 .. K-1, R levels K .. K + r_levels - 1. Each target position
    may only produce its own kind of token (``allowed``, additive -inf elsewhere).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        k, width = cfg.codebook_size, cfg.gpt_width
        self.length = cfg.r_tokens + cfg.n_tokens
        vocab = k + cfg.r_levels
        self.cond = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(self.length, width))
        self.drop = nn.Dropout(cfg.gpt_dropout)
        self.blocks = nn.ModuleList(CausalBlock(width, cfg.gpt_heads, cfg.gpt_dropout)
                                    for _ in range(cfg.gpt_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        allowed = torch.full((self.length, vocab), float("-inf"))
        allowed[: cfg.r_tokens, k:] = 0.0
        allowed[cfg.r_tokens :, :k] = 0.0
        self.register_buffer("allowed", allowed, persistent=False)  # (L, V)

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cond (B, 1), tokens (B, S <= L - 1) -> logits (B, S + 1, V) of positions 0 .. S."""
        x = torch.cat([self.cond(cond)[:, None], self.tok(tokens)], dim=1)
        x = self.drop(x + self.pos[: x.shape[1]])
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.ln_f(x)) + self.allowed[: x.shape[1]]

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, temperature: float, top_k: int,
                 generator: torch.Generator | None) -> torch.Tensor:
        """(B, 1) conditions -> (B, L) tokens, one position at a time with a key/value cache.

        Each token is drawn by inverting the cumulative tempered, top-k-restricted softmax
        at one uniform number per row, drawn from ``generator`` on its own device: exact,
        reproducible, and one random number per token instead of one per vocabulary entry
        (Gumbel-max): 20-25 % less sampling time at a 1000-code vocabulary on a CPU. The
        other kind's tokens have probability 0 and are never drawn (u > 0 below).
        """
        device = cond.device
        draw_on = generator.device if generator is not None else device
        caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.blocks)
        x = self.cond(cond)[:, None] + self.pos[0]
        out = []
        for k in range(self.length):
            for i, block in enumerate(self.blocks):
                x, caches[i] = block(x, caches[i])
            logits = self.head(self.ln_f(x[:, -1])) / temperature + self.allowed[k]  # (B, V)
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = torch.softmax(logits, dim=1).cumsum(1)  # (B, V)
            u = torch.rand(len(cdf), 1, generator=generator, device=draw_on).to(device).clamp(min=1e-12)
            token = (cdf < u * cdf[:, -1:]).sum(1).clamp(max=cdf.shape[1] - 1)  # (B,)
            out.append(token)
            if k + 1 < self.length:
                x = self.tok(token)[:, None] + self.pos[k + 1]
        return torch.stack(out, dim=1)


# ---- the model ------------------------------------------------------------------------
class VQModel(GenerativeModel):
    """Calo-VQ for one CaloChallenge dataset: autoencoder, EMA codebook, discriminator, prior."""

    def __init__(self, config: Config, detector: Any) -> None:
        super().__init__()
        if tuple(detector.parts) != ("showers",) or tuple(detector.conditions) != ("energy",):
            raise ValueError("calochallenge_vq needs a CaloChallenge detector (part 'showers', "
                             f"condition 'energy'), but got parts={detector.parts}, "
                             f"conditions={detector.conditions}")
        self.config = cfg = config
        self.n_voxels = int(detector.part_sizes["showers"])
        self.threshold_mev = float(detector.binning.threshold_mev)
        self.geom = Geometry(detector)
        t, d = cfg.n_tokens, cfg.embed_dim
        self.encoder = _mlp(self.n_voxels + 1, cfg.hidden_width, t * d, cfg.n_layers)
        self.decoder = _mlp(t * d + 1, cfg.hidden_width, self.n_voxels, cfg.n_layers)
        self.quantizer = EMAQuantizer(cfg.codebook_size, d, cfg.ema_decay)
        # The discriminator sees standardised log shares and log E_inc; always built, so
        # that the weights' layout does not depend on disc_weight.
        self.disc = nn.Sequential(
            nn.Linear(self.n_voxels + 1, cfg.disc_width), nn.LeakyReLU(0.2),
            nn.Linear(cfg.disc_width, cfg.disc_width), nn.LeakyReLU(0.2),
            nn.Linear(cfg.disc_width, 1),
        )
        self.prior = PriorGPT(cfg)
        self._pending_restart: torch.Tensor | None = None

    # ---- preparation -------------------------------------------------------------------
    def prepare(self, train: Any) -> dict[str, Any]:
        """Per-voxel mean and std of the log shares, the log floor, and the ranges of R and
        log E_inc (for the R tokens and the condition feature), from the training split."""
        n = len(train)
        chunks = [np.arange(i, min(i + PREPARE_CHUNK, n)) for i in range(0, n, PREPARE_CHUNK)]
        r_min, r_max, min_share = math.inf, -math.inf, math.inf
        energy = np.asarray(train.conditions["energy"], np.float64)
        for idx in chunks:
            x = train.batch_arrays(idx)["cells"]["showers"].astype(np.float64)
            total = x.sum(1)
            r = total / energy[idx]
            r_min, r_max = min(r_min, float(r.min())), max(r_max, float(r.max()))
            shares = x[total > 0] / total[total > 0, None]
            if (shares > 0).any():
                min_share = min(min_share, float(shares[shares > 0].min()))
        floor = float(np.clip(0.5 * min_share, *FLOOR_BOUNDS)) if math.isfinite(min_share) else 1e-8
        s1 = np.zeros(self.n_voxels)
        s2 = np.zeros(self.n_voxels)
        for idx in chunks:
            v = np.log(self._shares_np(train.batch_arrays(idx)["cells"]["showers"]) + floor)
            s1 += v.sum(0)
            s2 += np.square(v).sum(0)
        mean = s1 / max(n, 1)
        std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
        margin = R_MARGIN * max(r_max - r_min, 1e-3)
        log_e = np.log(energy)
        e_lo, e_hi = float(log_e.min()), float(log_e.max())
        if e_hi - e_lo < 1e-6:  # one energy: any fixed affine map works
            e_lo, e_hi = e_lo - 1.0, e_hi + 1.0
        return {
            "shape_mean": torch.tensor(mean, dtype=torch.float32),
            "shape_std": torch.tensor(np.maximum(std, STD_FLOOR), dtype=torch.float32),
            "share_floor": floor,
            "r_lo": max(0.0, r_min - margin),
            "r_hi": r_max + margin,
            "log_e_lo": e_lo,
            "log_e_hi": e_hi,
        }

    @staticmethod
    def _shares_np(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        total = x.sum(1, keepdims=True)
        return np.divide(x, total, out=np.zeros_like(x), where=total > 0)

    def _prep(self, name: str) -> Any:
        """A preparation value; a model without one has not been prepared (or loaded)."""
        if name in self.prepared.json:
            return self.prepared.json[name]
        if hasattr(self.prepared, name):
            return getattr(self.prepared, name)
        raise RuntimeError(f"calochallenge_vq: preparation {name!r} missing: call "
                           "model.load_preparation(model.prepare(train)) before training or sampling")

    # ---- transforms --------------------------------------------------------------------
    def _cond(self, energy: torch.Tensor) -> torch.Tensor:
        """(B,) MeV -> (B, 1) log E_inc mapped to [-1, 1] over the training range."""
        lo, hi = float(self._prep("log_e_lo")), float(self._prep("log_e_hi"))
        return (2 * (torch.log(energy.clamp(min=1e-3)) - lo) / (hi - lo) - 1)[:, None]

    def _standardise(self, shares: torch.Tensor) -> torch.Tensor:
        """Shares (B, V) -> standardised log shares (the encoder's and critic's input)."""
        floor = float(self._prep("share_floor"))
        return (torch.log(shares + floor) - self._prep("shape_mean")) / self._prep("shape_std")

    def _r_digits(self, r: torch.Tensor) -> torch.Tensor:
        """(B,) R -> (B, r_tokens) digits, most significant first."""
        cfg = self.config
        lo, hi = float(self._prep("r_lo")), float(self._prep("r_hi"))
        n_bins = cfg.r_levels ** cfg.r_tokens
        q = ((r - lo) / (hi - lo)).clamp(0, 1) * n_bins
        n = q.long().clamp(max=n_bins - 1)
        powers = cfg.r_levels ** torch.arange(cfg.r_tokens - 1, -1, -1, device=r.device)
        return (n[:, None] // powers) % cfg.r_levels

    def _r_value(self, digits: torch.Tensor, dither: torch.Tensor) -> torch.Tensor:
        """(B, r_tokens) digits and (B,) uniform [0, 1) dither -> (B,) R within its bin."""
        cfg = self.config
        lo, hi = float(self._prep("r_lo")), float(self._prep("r_hi"))
        powers = cfg.r_levels ** torch.arange(cfg.r_tokens - 1, -1, -1, device=digits.device)
        n = (digits * powers).sum(1).to(dither.dtype)
        return (lo + (n + dither) / cfg.r_levels ** cfg.r_tokens * (hi - lo)).clamp(min=0)

    def _encode(self, v: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, V) standardised shares, (B, 1) -> (B, T, D) layer-normalised encoder outputs."""
        z = self.encoder(torch.cat([v, cond], dim=1))
        z = z.view(len(v), self.config.n_tokens, self.config.embed_dim)
        return F.layer_norm(z, (self.config.embed_dim,))

    def _decode(self, zq: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, T, D) code vectors, (B, 1) -> (B, V) log shares (a log-softmax over voxels)."""
        logits = self.decoder(torch.cat([zq.flatten(1), cond], dim=1))
        return F.log_softmax(logits, dim=1)

    # ---- phases and optimisers ---------------------------------------------------------
    def phases(self) -> tuple[Phase, ...]:
        """Step 1 (autoencoder, not scoreable), then step 2 (prior, scored)."""
        share = self.config.autoencoder_share
        return (Phase("autoencoder", share, scoreable=False), Phase("prior", 1.0 - share))

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """[autoencoder, discriminator, prior]: the first is the one every step-1 update
        starts with; betas (0.5, 0.9) for the discriminator damp GAN cycling, (0.9, 0.95)
        for the prior as in minGPT."""
        ae = [*self.encoder.parameters(), *self.decoder.parameters()]
        return [
            torch.optim.Adam(ae, lr=self.config.lr_autoencoder),
            torch.optim.Adam(self.disc.parameters(), lr=self.config.lr_disc, betas=(0.5, 0.9)),
            torch.optim.Adam(self.prior.parameters(), lr=self.config.lr_prior, betas=(0.9, 0.95)),
        ]

    def training_state(self) -> dict[str, Any]:
        """The codes to restart at the next step-1 update (decided at the last epoch end)."""
        pending = self._pending_restart
        return {"pending_restart": (pending.cpu() if pending is not None
                                    else torch.zeros(self.config.codebook_size, dtype=torch.bool))}

    def load_training_state(self, state: dict[str, Any]) -> None:
        pending = state.get("pending_restart")
        self._pending_restart = (pending.to(self.quantizer.codebook.device)
                                 if pending is not None and bool(pending.any()) else None)

    # ---- training ----------------------------------------------------------------------
    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], ctx: TrainContext
                   ) -> dict[str, float]:
        """One update of the current phase's modules."""
        if ctx.phase == "autoencoder":
            return self._train_autoencoder(batch, optimizers, ctx)
        if ctx.phase == "prior":
            return self._train_prior(batch, optimizers, ctx)
        raise ValueError(f"calochallenge_vq has phases 'autoencoder' and 'prior', but got {ctx.phase!r}")

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shares (B, V), R (B,), condition feature (B, 1) and standardised shares (B, V)."""
        x = batch["cells"]["showers"].float()
        energy = batch["conditions"]["energy"].float()
        total = x.sum(1)
        shares = x / total.clamp(min=1e-12)[:, None]
        cond = self._cond(energy)
        return shares, total / energy.clamp(min=1e-3), cond, self._standardise(shares)

    def _physics_losses(self, shares: torch.Tensor, log_hat: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
        """Layer-share, centre and width differences (the seed's physics-aware terms)."""
        layer, centre, width = self.geom.features(shares)
        layer_hat, centre_hat, width_hat = self.geom.features(log_hat.exp())
        occupied = (layer > 1e-6).float()[:, :, None]  # centres of empty layers are undefined
        n_occ = occupied.sum().clamp(min=1) * centre.shape[2]
        return {
            "layer": (layer_hat - layer).abs().sum(1).mean(),
            "centre": ((centre_hat - centre).abs() * occupied).sum() / n_occ,
            "width": ((width_hat - width).abs() * occupied).sum() / n_occ,
        }

    def _train_autoencoder(self, batch: Batch, optimizers: list[torch.optim.Optimizer],
                           ctx: TrainContext) -> dict[str, float]:
        cfg = self.config
        opt_ae, opt_disc, _ = optimizers
        shares, _, cond, v = self._inputs(batch)
        z = self._encode(v, cond)
        if self._pending_restart is not None:  # codes unused last epoch: new places first
            self.quantizer.restart(self._pending_restart, z, ctx)
            self._pending_restart = None
        idx = self.quantizer.assign(z.detach())
        zq = self.quantizer.embed(idx)
        commit = F.mse_loss(z, zq)
        log_hat = self._decode(z + (zq - z).detach(), cond)  # straight-through estimator
        v_hat = self._standardise(log_hat.exp())
        pixel = F.mse_loss(v_hat, v)
        kl = (shares * (torch.log(shares.clamp(min=1e-30)) - log_hat)).sum(1).mean()
        phys = self._physics_losses(shares, log_hat)
        rec = (cfg.pixel_weight * pixel + cfg.kl_weight * kl + cfg.layer_weight * phys["layer"]
               + cfg.centre_weight * phys["centre"] + cfg.width_weight * phys["width"])
        use_disc = cfg.disc_weight > 0 and ctx.phase_epoch >= cfg.disc_start_epoch
        adv = lam = rec.new_zeros(())
        if use_disc:
            self.disc.requires_grad_(False)  # no discriminator gradients in this update
            adv = -self.disc(torch.cat([v_hat, cond], dim=1)).mean()  # hinge generator loss
            self.disc.requires_grad_(True)
            lam = rec.new_ones(())
            if cfg.adaptive_disc_weight:
                last = self.decoder[-1].weight
                g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
                g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
                lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()
        loss = rec + cfg.beta * commit + cfg.disc_weight * lam * adv
        ctx.step(loss, opt_ae)
        loss_disc = rec.new_zeros(())
        if use_disc:
            real = self.disc(torch.cat([v, cond], dim=1))
            fake = self.disc(torch.cat([v_hat.detach(), cond], dim=1))
            loss_disc = F.relu(1 - real).mean() + F.relu(1 + fake).mean()  # hinge
            ctx.step(loss_disc, opt_disc)
        self.quantizer.update(z, idx, ctx.all_reduce_mean)
        self.quantizer.count(idx)
        return {
            "loss_autoencoder": float(loss.detach()),
            "loss_pixel": float(pixel.detach()),
            "loss_kl": float(kl.detach()),
            "loss_layer": float(phys["layer"].detach()),
            "loss_centre": float(phys["centre"].detach()),
            "loss_width": float(phys["width"].detach()),
            "loss_commit": float(commit.detach()),
            "loss_adv": float(adv.detach()),
            "adaptive_weight": float(lam),
            "loss_disc": float(loss_disc.detach()),
        }

    def _targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's condition (B, 1) and token sequence (B, L) of a batch: R digits, then
        the frozen encoder's codes."""
        with torch.no_grad():
            _, r, cond, v = self._inputs(batch)
            idx = self.quantizer.assign(self._encode(v, cond))
            self.quantizer.count(idx)
            tokens = torch.cat([self._r_digits(r) + self.config.codebook_size, idx], dim=1)
        return cond, tokens

    def _train_prior(self, batch: Batch, optimizers: list[torch.optim.Optimizer],
                     ctx: TrainContext) -> dict[str, float]:
        """Next-token cross-entropy of the GPT on the frozen autoencoder's tokens."""
        self._pending_restart = None  # codes are frozen from here on
        cond, tokens = self._targets(batch)
        logits = self.prior(cond, tokens[:, :-1])  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        ctx.step(loss, optimizers[2])
        r = self.config.r_tokens
        with torch.no_grad():
            hit = logits.argmax(2) == tokens
        return {
            "loss_prior": float(loss.detach()),
            "accuracy_r": float(hit[:, :r].float().mean()),
            "accuracy_codes": float(hit[:, r:].float().mean()),
        }

    # ---- health ------------------------------------------------------------------------
    def epoch_metrics(self, ctx: TrainContext) -> dict[str, float]:
        """Codebook usage over the epoch's training batches of every rank.

        code_perplexity: exp(entropy) of the code frequencies (the number of equally used
        codes that would give the same entropy); dead_codes: codes no batch used;
        code_usage: the used fraction. Pruned (TrialPruned) below ``min_code_usage``.
        An epoch without training batches (a sampling-only trial) reports nothing.
        """
        counts = ctx.all_reduce_mean(self.quantizer.epoch_counts.clone())
        self.quantizer.epoch_counts.zero_()
        total = float(counts.sum())
        if total <= 0:
            return {}
        size = self.config.codebook_size
        p = counts / total
        perplexity = float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))
        used = int((counts > 0).sum())
        need = math.ceil(self.config.min_code_usage * size)
        if used < need:
            raise TrialPruned(
                f"codebook collapsed: {used} of {size} codes used in epoch {ctx.epoch + 1} "
                f"({ctx.phase}), perplexity {perplexity:.1f}; min_code_usage="
                f"{self.config.min_code_usage} needs at least {need}")
        if ctx.phase == "autoencoder" and self.config.restart_dead_codes and used < size:
            self._pending_restart = counts <= 0
        return {"code_perplexity": perplexity, "dead_codes": float(size - used),
                "code_usage": used / size}

    # ---- step 2 on a registered model --------------------------------------------------
    def inherit(self, parent: GenerativeModel, train_phases: tuple[str, ...]) -> None:
        """Keep the parent's autoencoder, codebook and discriminator; the prior starts
        fresh (its width, depth and R tokens may differ from the parent's).

        Retraining the autoencoder re-draws every code, which the parent's prior no longer
        describes, so "autoencoder" without "prior" is refused; with both, nothing of the
        parent is kept but its preparation (loaded before this call).
        """
        phases = set(train_phases)
        unknown = phases - {"autoencoder", "prior"}
        if unknown:
            raise ValueError(f"calochallenge_vq has phases 'autoencoder' and 'prior', but got {sorted(unknown)}")
        if "autoencoder" in phases and "prior" not in phases:
            raise ValueError("retraining the autoencoder changes every code: train_phases must also "
                             "include 'prior'")
        if "autoencoder" in phases:
            log.info("retraining both phases: only the parent's preparation is kept")
            return
        if not phases:  # sampling-only: everything is the parent's
            self.load_state_dict(parent.state_dict())
            return
        kept = {k: v for k, v in parent.state_dict().items() if not k.startswith("prior.")}
        missing, unexpected = self.load_state_dict(kept, strict=False)
        wrong = [k for k in missing if not k.startswith("prior.")]
        if wrong or unexpected:
            raise ValueError(f"parent model does not match: missing {wrong}, unexpected {unexpected}")

    # ---- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None,
               **kwargs: Any) -> dict[str, torch.Tensor]:
        """One shower per row, MeV, >= 0: GPT tokens -> R and codes -> decoder softmax.

        Full cost is the only cost: one GPT pass of r_tokens + n_tokens steps per batch.
        """
        if kwargs:
            raise TypeError(f"calochallenge_vq.sample() has no cost knobs, but got {sorted(kwargs)}")
        cfg = self.config
        was_training = self.training
        self.eval()
        device = self.quantizer.codebook.device
        energy = conditions["energy"].to(device).float()
        if len(energy) == 0:
            self.train(was_training)
            return {"showers": torch.zeros(0, self.n_voxels, device=device)}
        cond = self._cond(energy)
        tokens = self.prior.generate(cond, cfg.temperature, cfg.top_k, generator)
        draw_on = generator.device if generator is not None else device
        dither = torch.rand(len(energy), generator=generator, device=draw_on).to(device)
        r = self._r_value(tokens[:, : cfg.r_tokens] - cfg.codebook_size, dither)
        shares = self._decode(self.quantizer.embed(tokens[:, cfg.r_tokens :]), cond).exp()
        total = r * energy  # (B,) MeV
        showers = shares * total[:, None]
        # The data are zero under the readout threshold: zero those voxels and rescale the
        # rest so that the shower keeps the prior's R (keep the hottest voxel at least).
        keep = showers >= self.threshold_mev
        keep |= F.one_hot(showers.argmax(1), self.n_voxels).bool()
        showers = showers * keep
        showers = showers * (total / showers.sum(1).clamp(min=1e-30))[:, None]
        self.train(was_training)
        return {"showers": showers}


def build(config: Config, detector: Any) -> VQModel:
    """The model for a CaloChallenge detector (reads its part size, binning and threshold)."""
    return VQModel(config, detector)


__all__ = ["DETECTORS", "PHASE_PARAMS", "SAMPLING_PARAMS", "Config", "EMAQuantizer", "PriorGPT",
           "VQModel", "build"]
