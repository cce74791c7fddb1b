"""ATLAS QVAE: a conditional VAE with binary latents and a partitioned RBM prior.

The design follows CaloQVAE (seed 003; Hoque et al., arXiv 2312.03179) and its 4-partite
successor Calo4pQVAE (Lu et al., arXiv 2412.04677; conditioning: arXiv 2410.22870):

    shower x (voxels / E_inc, log-compressed), log E_inc
        -> encoder MLP -> logits of the binary latents of partitions 1 .. P-1
        -> relaxed sample (Gumbel-sigmoid with an annealed temperature, or hard samples
           with a straight-through gradient)
    partition 0 = the incident energy as a thermometer code (clamped, never sampled
        when generating)
    [partition 0, latents], log E_inc -> decoder MLP -> two heads per voxel:
        hit probability (Bernoulli) and log-compressed energy of a hit
    prior: a P-partite restricted Boltzmann machine, couplings only between partitions
        (P = 4 x 302 nodes in the seed: a D-Wave annealer's per-partition limit), so
        that all nodes of one partition are independent given the others and block
        Gibbs sampling updates a whole partition at once.

Training (phase ``vae``): the encoder and decoder minimise the negative ELBO of a
discrete VAE with an RBM prior as in GumBolt (Khoshaman & Amin, arXiv 1805.07349): the
reconstruction (hit BCE + ``mse_weight`` x energy MSE on hit voxels) plus beta x (minus the
posterior entropy + RBM energy of the relaxed sample), with beta annealed linearly from 0
(KL annealing, Bowman et al., arXiv 1511.06349). The log-partition term of the KL does
not depend on the encoder; its gradient with respect to the RBM is the negative phase of
contrastive divergence. The RBM is trained by persistent contrastive divergence (PCD,
Tieleman 2008; Hinton's CD, Neural Computation 14 (2002) 1771) through a standard torch
optimiser: the surrogate loss mean E(z_posterior) - mean E(z_chains), with both samples
detached, has exactly minus the CD statistic as its gradient
(dL/db = <z>_model - <z>_data, dL/dW_kl = <z_k z_l^T>_model - <z_k z_l^T>_data), so the
trainer's ``ctx.step`` (gradient average over ranks, clipping, Adam) applies unchanged.
Phase ``prior`` then freezes the encoder and decoder and fits the RBM alone to the final
posterior (the seed's "freeze VAE" stage), with its own learning rate and chain length.

Persistent chains: one set of ``n_chains`` chains with its own random stream, identical
on every DDP rank (same seed, same weights), kept in :meth:`training_state`; the positive
phase differs per rank and the trainer averages the gradients, so a distributed update is
the single-process update on the whole batch, and a resumed trial continues exactly.

Health (:meth:`epoch_metrics`, MLflow ``health_*``): the seed's Frobenius metrics of
cross-partition correlation for encoder posterior samples and for RBM samples (clamped to
the same energies), their per-partition gap, the chains' energy autocorrelation and flip
rate, and the share of active latent units. A sampler whose chains no longer move is
pruned (:class:`TrialPruned`): its samples would not be samples of the prior.
"""

from __future__ import annotations

import logging
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
    Phase,
    TrainContext,
    TrialPruned,
    bounded,
    check_fields,
)

log = logging.getLogger("calotune.models.atlas_qvae")

DETECTORS = ("calochallenge-1-photons", "calochallenge-1-pions", "atlas-regular")

#: Config fields that change only how ``sample`` runs (no parameter shape): a search on a
#: registered model may vary these without training.
SAMPLING_PARAMS: tuple[str, ...] = ("gibbs_steps_sample", "gibbs_steps_validation", "sample_beta")
#: Fields that only the ``prior`` phase reads: a search with ``train_phases: [prior]``
#: refits the RBM on a registered model's frozen encoder and decoder with these.
PHASE_PARAMS: dict[str, tuple[str, ...]] = {"prior": ("prior_lr", "prior_gibbs_steps")}

#: Voxel energies are modelled as u = log1p(e / VALUE_EPS) / log1p(1 / VALUE_EPS) with
#: e = voxel / E_inc: the 1 MeV threshold at 4 TeV (e = 2.5e-7) maps to u ~ 0.02, a
#: voxel holding the whole shower to u = 1.
VALUE_EPS = 1e-6
_LOG_RANGE = math.log1p(1.0 / VALUE_EPS)
#: Largest u a generated voxel may take (a voxel with 3x the incident energy): keeps
#: expm1 finite for an untrained decoder.
MAX_U = 1.08
#: Largest generated E_tot / E_inc with ``renormalise`` (an untrained head stays finite).
MAX_TOTAL = 3.0
#: Occupancy clip for the decoder's base rates (logit of 1e-4 .. 1 - 1e-4).
_OCC_CLIP = 1e-4
#: Rows per chunk in ``sample``: bounds the (rows, voxels) temporaries.
SAMPLE_CHUNK = 1024
#: Posterior samples kept per epoch for the health metrics, and Gibbs sweeps of the
#: health run (the first half is burn-in for the autocorrelation).
HEALTH_SAMPLES = 512
HEALTH_SWEEPS = 60
#: Below this mean fraction of latent units flipping per sweep, the sampler is frozen.
FROZEN_FLIP_RATE = 1e-4
#: ds1 energies 2^8 .. 2^22 MeV: the energy code's range before ``prepare`` has run.
_DEFAULT_LOG10_E = (8 * math.log10(2.0), 22 * math.log10(2.0))


@dataclass
class Config:
    """Every tunable knob of the ATLAS QVAE family (flat names, as search spaces use)."""

    n_partitions: int = bounded(4, ge=2, le=8)
    """RBM partitions, the first holding the incident-energy code (seed: 4). Cost of one
    Gibbs sweep grows as partitions^2 x nodes^2."""
    nodes_per_partition: int = bounded(64, gt=0, le=512)
    """Binary nodes per partition (seed: 302, a D-Wave Pegasus annealer's per-partition
    limit; 512 in later versions). 64 keeps CPU trials fast. The bounds keep the health
    metrics' (P n)^2 correlation matrices under 70 MB."""
    encoder_width: int = bounded(256, gt=0)
    """Hidden width of the encoder MLP (seed: 500 .. 300, tapering)."""
    encoder_layers: int = bounded(2, ge=1, le=8)
    """Hidden layers of the encoder."""
    decoder_width: int = bounded(256, gt=0)
    """Hidden width of the decoder MLP (seed: 800 .. 500)."""
    decoder_layers: int = bounded(2, ge=1, le=8)
    """Hidden layers of the decoder, before its two heads (hits, energies)."""
    relaxation: Literal["gumbel", "straight_through"] = "gumbel"
    """How gradients pass the binary latents: the Gumbel-sigmoid (binary Concrete,
    arXiv 1611.00712 / 1611.01144) relaxation, or hard samples with the relaxed sample's
    gradient (straight-through, arXiv 1308.3432)."""
    tau_start: float = bounded(1.0, gt=0)
    """Relaxation temperature at step 0: smooth, low-variance gradients."""
    tau_end: float = bounded(0.3, gt=0)
    """Temperature after ``tau_anneal_steps``: closer to binary, so the decoder learns
    to read the latents the prior will produce."""
    tau_anneal_steps: int = bounded(200, ge=0)
    """Optimisation steps of the linear temperature schedule (0: tau_end throughout)."""
    kl_weight: float = bounded(1.0, ge=0)
    """Final weight of the KL term (1: the ELBO)."""
    kl_anneal_steps: int = bounded(200, ge=0)
    """Steps over which the KL weight rises linearly from 0 (0: full weight from the
    start); without annealing the posterior collapses onto the untrained prior."""
    mse_weight: float = bounded(1.0, ge=0)
    """Weight of the energy head's squared error on hit voxels against the hit head's
    cross-entropy (the seed's MSE weight)."""
    renormalise: bool = True
    """Rescale each generated shower to the total energy a third decoder head predicts
    (log E_tot / E_inc, trained by squared error): independent per-voxel noise alone makes
    E_tot / E_inc far broader than a calorimeter's resolution."""
    lr_vae: float = bounded(1e-3, gt=0)
    """Adam learning rate of the encoder and decoder (seed: 1e-4 over hundreds of epochs)."""
    lr_rbm: float = bounded(1e-3, gt=0)
    """Adam learning rate of the RBM in the ``vae`` phase."""
    n_chains: int = bounded(256, gt=0)
    """Persistent Gibbs chains of the negative phase."""
    gibbs_steps_train: int = bounded(3, gt=0)
    """Block-Gibbs sweeps of the persistent chains per update in the ``vae`` phase."""
    prior_share: float = bounded(0.25, gt=0, lt=1)
    """Share of the trial's epochs in the ``prior`` phase (frozen VAE, RBM only)."""
    prior_lr: float = bounded(1e-3, gt=0)
    """Adam learning rate of the RBM in the ``prior`` phase."""
    prior_gibbs_steps: int = bounded(10, gt=0)
    """Sweeps of the persistent chains per update in the ``prior`` phase: the target no
    longer moves, so longer chains buy a less biased negative phase."""
    gibbs_steps_sample: int = bounded(200, gt=0)
    """Block-Gibbs sweeps from a random start when generating (seed: 3000)."""
    gibbs_steps_validation: int = bounded(0, ge=0)
    """Sweeps for per-epoch validation samples; 0 (or >= gibbs_steps_sample) validates at
    full cost. Fewer makes scores carry the ``_fast`` suffix."""
    sample_beta: float = bounded(1.0, gt=0)
    """Inverse temperature of the RBM when generating (an annealer's effective beta,
    arXiv 2410.22870); < 1 flattens the prior, > 1 sharpens it."""

    def __post_init__(self) -> None:
        """Refuse a configuration the model cannot train, naming the rule and the value."""
        check_fields(self)
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end <= tau_start must hold (the temperature is annealed "
                             f"down), but got tau_end={self.tau_end}, tau_start={self.tau_start}")


# ============================================================================ the prior
class PartitionedRBM(nn.Module):
    """A P-partite RBM over binary z = (z_0, ..., z_{P-1}), each z_k of n nodes:

        E(z) = - sum_k b_k . z_k - sum_{k<l} z_k^T W_kl z_l,     p(z) = exp(-E(z)) / Z.

    No couplings inside a partition, so p(z_k | rest) factorises:
    p(z_k = 1 | rest) = sigmoid(beta * h_k) with h_k = b_k + sum_{m != k} W_km z_m (W_mk = W_km^T).
    States are (B, P, n) float tensors of 0 and 1.
    """

    def __init__(self, n_partitions: int, nodes: int) -> None:
        super().__init__()
        self.n_partitions = n_partitions
        self.nodes = nodes
        self.bias = nn.Parameter(torch.zeros(n_partitions, nodes))
        self.weights = nn.ParameterDict({
            self.key(k, m): nn.Parameter(0.01 * torch.randn(nodes, nodes))
            for k in range(n_partitions) for m in range(k + 1, n_partitions)
        })

    @staticmethod
    def key(k: int, m: int) -> str:
        """ParameterDict key of W_km (k < m)."""
        return f"{k}_{m}"

    def pairs(self) -> list[tuple[int, int]]:
        return [(k, m) for k in range(self.n_partitions) for m in range(k + 1, self.n_partitions)]

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """(B, P, n) -> (B,) energies; differentiable in z (relaxed samples) and in the
        parameters (the CD surrogate)."""
        out = -(z * self.bias).sum(dim=(1, 2))
        for k, m in self.pairs():
            out = out - ((z[:, k] @ self.weights[self.key(k, m)]) * z[:, m]).sum(1)
        return out

    def field(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """(B, n) input of partition k's nodes given the other partitions of z."""
        h = self.bias[k].expand(z.shape[0], -1)
        for m in range(self.n_partitions):
            if m < k:
                h = h + z[:, m] @ self.weights[self.key(m, k)]
            elif m > k:
                h = h + z[:, m] @ self.weights[self.key(k, m)].T
        return h

    @torch.no_grad()
    def gibbs(self, z: torch.Tensor, sweeps: int, generator: torch.Generator | None,
              *, first: int = 0, beta: float = 1.0, trace: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``sweeps`` block-Gibbs sweeps over partitions ``first`` .. P-1 (the ones before
        stay clamped). Returns the new state and, if ``trace``, the (sweeps, B) energies
        after each sweep and the (sweeps,) fraction of sampled nodes that flipped in it."""
        z = z.clone()
        energies, flips = [], []
        draw_on = generator.device if generator is not None else z.device
        for _ in range(sweeps):
            before = z[:, first:].clone() if trace else None
            for k in range(first, self.n_partitions):
                p = torch.sigmoid(beta * self.field(z, k))
                u = torch.rand(p.shape, generator=generator, device=draw_on).to(z.device)
                z[:, k] = (u < p).to(z.dtype)
            if trace:
                energies.append(self.energy(z))
                flips.append((z[:, first:] != before).float().mean())
        if not trace or not sweeps:
            return z, None, None
        return z, torch.stack(energies), torch.stack(flips)

    def cd_loss(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Surrogate whose parameter gradient is minus the contrastive-divergence statistic:
        mean E(positive) - mean E(negative), both samples detached."""
        return self.energy(positive.detach()).mean() - self.energy(negative.detach()).mean()


def _mlp(n_in: int, width: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(n_in if i == 0 else width, width), nn.SiLU()]
    return nn.Sequential(*blocks)


# ============================================================================ the model
class AtlasQVAE(GenerativeModel):
    """Conditional discrete VAE with a partitioned RBM prior, for one CaloChallenge-style
    grid (a single part of ``n_voxels`` cells)."""

    def __init__(self, config: Config, part_sizes: dict[str, int], conditions: tuple[str, ...]):
        super().__init__()
        if len(part_sizes) != 1:
            raise ValueError(f"atlas_qvae models one cell grid, but the detector has parts {sorted(part_sizes)}")
        if "energy" not in conditions:
            raise ValueError(f"conditions must include 'energy', but got {conditions}")
        self.config = config
        (self.part, self.n_voxels), = part_sizes.items()
        P, n = config.n_partitions, config.nodes_per_partition
        self.n_latent = (P - 1) * n  # encoded nodes; partition 0 is the energy code
        self.encoder = _mlp(self.n_voxels + 1, config.encoder_width, config.encoder_layers)
        self.encoder_out = nn.Linear(config.encoder_width, self.n_latent)
        self.decoder = _mlp(P * n + 1, config.decoder_width, config.decoder_layers)
        self.hit_head = nn.Linear(config.decoder_width, self.n_voxels)
        self.value_head = nn.Linear(config.decoder_width, self.n_voxels)
        self.total_head = nn.Linear(config.decoder_width, 1)  # log(E_tot / E_inc)
        # Spread of a hit's u around the decoder's mean, per voxel: generation draws
        # u ~ N(mean, std), which restores the width of the voxel-energy spectrum and the
        # log-normal mean exp(mu + sigma^2 / 2) that decoding the mean alone would miss.
        self.value_log_std = nn.Parameter(torch.full((self.n_voxels,), math.log(0.05)))
        with torch.no_grad():  # start near the data's base rates (prepared offsets)
            for head in (self.hit_head, self.value_head):
                head.weight.mul_(0.1)
                head.bias.zero_()
        self.rbm = PartitionedRBM(P, n)
        # The persistent chains' own random stream: seeded from the global generator, which
        # the trainer seeds identically on every rank before building the model.
        self._chain_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self._chains: torch.Tensor | None = None  # (n_chains, P, n)
        self._chain_rng: torch.Tensor | None = None  # its generator's state
        self._post_buffer: torch.Tensor | None = None  # this epoch's posterior samples
        self._buffer_epoch = -1

    # ---- preparation ----------------------------------------------------------------
    def prepare(self, train: Any) -> dict[str, Any]:
        """Energy range (for the code and the conditioning) and each voxel's hit rate and
        mean log-energy on the training split: the decoder predicts offsets from these."""
        energy = np.asarray(train.conditions["energy"], dtype=np.float64)
        log_e = np.log10(np.clip(energy, 1e-3, None))
        hits = np.zeros(self.n_voxels)
        u_sum = np.zeros(self.n_voxels)
        for start in range(0, len(train), 2048):
            idx = np.arange(start, min(start + 2048, len(train)))
            cells = train.batch_arrays(idx)["cells"][self.part].astype(np.float64)
            e_inc = np.clip(energy[idx], 1e-3, None)[:, None]
            hit = cells > 0
            hits += hit.sum(0)
            u_sum += np.where(hit, np.log1p(cells / e_inc / VALUE_EPS) / _LOG_RANGE, 0.0).sum(0)
        occupancy = np.clip(hits / max(len(train), 1), _OCC_CLIP, 1 - _OCC_CLIP)
        return {
            "hit_logit": torch.tensor(np.log(occupancy / (1 - occupancy)), dtype=torch.float32),
            "value_mean": torch.tensor(u_sum / np.maximum(hits, 1), dtype=torch.float32),
            "log10_e_min": float(log_e.min()),
            "log10_e_max": float(log_e.max()),
        }

    def _offsets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        hit = getattr(self.prepared, "hit_logit", None)
        value = getattr(self.prepared, "value_mean", None)
        if hit is None or value is None:  # an unprepared model: neutral offsets
            zeros = torch.zeros(self.n_voxels, device=device)
            return zeros, zeros
        return hit, value

    def _energy_unit(self, energy: torch.Tensor) -> torch.Tensor:
        """log10 E_inc mapped onto [0, 1] over the training range."""
        lo = float(self.prepared.json.get("log10_e_min", _DEFAULT_LOG10_E[0]))
        hi = float(self.prepared.json.get("log10_e_max", _DEFAULT_LOG10_E[1]))
        x = torch.log10(energy.clamp(min=1e-3))
        if hi <= lo:
            return torch.full_like(x, 0.5)
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def energy_code(self, energy: torch.Tensor) -> torch.Tensor:
        """(B,) MeV -> (B, n) thermometer code of log E: node j is on iff the energy's unit
        position exceeds (j + 1/2) / n, so nearby energies share most nodes."""
        n = self.config.nodes_per_partition
        steps = (torch.arange(n, device=energy.device, dtype=torch.float32) + 0.5) / n
        return (self._energy_unit(energy)[:, None] > steps).float()

    # ---- networks -------------------------------------------------------------------
    def _to_u(self, cells: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        return torch.log1p(cells.clamp(min=0) / energy.clamp(min=1e-3)[:, None] / VALUE_EPS) / _LOG_RANGE

    def encode(self, u: torch.Tensor, e_unit: torch.Tensor) -> torch.Tensor:
        """(B, n_voxels), (B,) -> (B, n_latent) posterior logits of partitions 1 .. P-1."""
        return self.encoder_out(self.encoder(torch.cat([u, e_unit[:, None]], dim=1)))

    def decode(self, z: torch.Tensor, e_unit: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, P, n) full latent state, (B,) -> hit logits and u, each (B, n_voxels), and
        the predicted log(E_tot / E_inc), (B,)."""
        h = self.decoder(torch.cat([z.flatten(1), e_unit[:, None]], dim=1))
        hit_off, value_off = self._offsets(h.device)
        return self.hit_head(h) + hit_off, self.value_head(h) + value_off, self.total_head(h)[:, 0]

    def _full(self, code: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Energy code (B, n) and latents (B, (P-1) n) -> (B, P, n)."""
        P, n = self.config.n_partitions, self.config.nodes_per_partition
        return torch.cat([code, latent], dim=1).view(-1, P, n)

    # ---- schedules --------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        cfg = self.config
        if cfg.tau_anneal_steps == 0:
            return cfg.tau_end
        frac = min(1.0, step / cfg.tau_anneal_steps)
        return cfg.tau_start + frac * (cfg.tau_end - cfg.tau_start)

    def kl_beta(self, step: int) -> float:
        cfg = self.config
        if cfg.kl_anneal_steps == 0:
            return cfg.kl_weight
        return cfg.kl_weight * min(1.0, step / cfg.kl_anneal_steps)

    # ---- persistent chains ---------------------------------------------------------------
    def _chain_generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self._chain_rng is None:
            gen.manual_seed(self._chain_seed)
        else:
            gen.set_state(self._chain_rng)
        return gen

    def _advance_chains(self, sweeps: int, device: torch.device) -> torch.Tensor:
        """Run the persistent chains ``sweeps`` sweeps (all partitions: the RBM models the
        joint distribution of energy code and latents); returns them (n_chains, P, n)."""
        gen = self._chain_generator(device)
        P, n = self.config.n_partitions, self.config.nodes_per_partition
        if self._chains is None:
            u = torch.rand((self.config.n_chains, P, n), generator=gen, device=device)
            self._chains = (u < 0.5).float()
        self._chains, _, _ = self.rbm.gibbs(self._chains.to(device), sweeps, gen)
        self._chain_rng = gen.get_state()
        return self._chains

    def training_state(self) -> dict[str, Any]:
        """The persistent chains and their random stream: a resumed trial then draws the
        very same negative phase as one never stopped."""
        if self._chains is None:
            return {}
        return {"chains": self._chains.detach().cpu(), "chain_rng": self._chain_rng,
                "chain_seed": self._chain_seed}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        chains = state["chains"]
        want = (self.config.n_chains, self.config.n_partitions, self.config.nodes_per_partition)
        if tuple(chains.shape) != want:
            raise ValueError(f"persistent chains of shape {tuple(chains.shape)} do not fit this model "
                             f"({want})")
        device = self.rbm.bias.device
        self._chains = chains.to(device=device, dtype=torch.float32)
        self._chain_rng = state["chain_rng"].cpu()
        self._chain_seed = int(state["chain_seed"])

    # ---- training -----------------------------------------------------------------------
    def phases(self) -> tuple[Phase, ...]:
        """``vae`` (encoder, decoder and RBM together), then ``prior`` (RBM alone on the
        frozen encoder); both end in a usable generator, so both are scored."""
        share = self.config.prior_share
        return (Phase("vae", 1.0 - share), Phase("prior", share))

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """[VAE (encoder + decoder), RBM]; both are saved with every checkpoint."""
        rbm = list(self.rbm.parameters())
        rbm_ids = {id(p) for p in rbm}
        vae = [p for p in self.parameters() if id(p) not in rbm_ids]
        return [torch.optim.Adam(vae, lr=self.config.lr_vae),
                torch.optim.Adam(rbm, lr=self.config.lr_rbm)]

    def _keep_for_health(self, z: torch.Tensor, epoch: int) -> None:
        """Keep up to HEALTH_SAMPLES of this epoch's hard posterior states (latest last)."""
        if epoch != self._buffer_epoch or self._post_buffer is None:
            self._post_buffer, self._buffer_epoch = None, epoch
            kept = z
        else:
            kept = torch.cat([self._post_buffer, z])
        self._post_buffer = kept[-HEALTH_SAMPLES:].detach()

    def train_step(
        self, batch: Batch, optimizers: list[torch.optim.Optimizer], ctx: TrainContext
    ) -> dict[str, float]:
        """``vae``: one VAE update, then one PCD update of the RBM; ``prior``: the PCD
        update alone, on the frozen encoder's hard posterior samples."""
        cfg = self.config
        opt_vae, opt_rbm = optimizers
        energy = batch["conditions"]["energy"].float()
        cells = batch["cells"][self.part].float()
        e_unit = self._energy_unit(energy)
        code = self.energy_code(energy)
        u = self._to_u(cells, energy)
        out: dict[str, float] = {}

        if ctx.phase == "prior":
            with torch.no_grad():
                logits = self.encode(u, e_unit)
                noise = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                hard = (logits + torch.log(noise / (1 - noise)) > 0).float()
            lr, sweeps = cfg.prior_lr, cfg.prior_gibbs_steps
        else:
            logits = self.encode(u, e_unit)
            noise = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logistic = torch.log(noise / (1 - noise))
            tau = self.temperature(ctx.global_step)
            relaxed = torch.sigmoid((logits + logistic) / tau)
            hard = (logits + logistic > 0).float()
            latent = relaxed if cfg.relaxation == "gumbel" else hard + relaxed - relaxed.detach()
            z = self._full(code, latent)
            hit_logit, value, log_total = self.decode(z, e_unit)
            hit = (cells > 0).float()
            # Sums over voxels and latent nodes keep the ELBO's balance; dividing both by
            # the voxel count keeps the loss (and the trainer's gradient clipping) at O(1).
            loss_hit = F.binary_cross_entropy_with_logits(hit_logit, hit, reduction="none").sum(1)
            loss_mse = ((value - u).square() * hit).sum(1)
            if cfg.renormalise:  # one more squared error: the shower's log energy ratio
                ratio = cells.sum(1) / energy.clamp(min=1e-3)
                loss_mse = loss_mse + (log_total - torch.log(ratio + VALUE_EPS)).square()
            # Gaussian NLL of the per-voxel spread around the (detached) mean: trains only
            # value_log_std, so the seed's MSE alone shapes the mean.
            log_std = self.value_log_std
            loss_std = ((0.5 * (value.detach() - u).square() * torch.exp(-2 * log_std) + log_std)
                        * hit).sum(1)
            q = torch.sigmoid(logits)
            neg_entropy = -F.binary_cross_entropy_with_logits(logits, q, reduction="none").sum(1)
            prior_energy = self.rbm.energy(z)  # the KL's prior term, up to log Z
            beta = self.kl_beta(ctx.global_step)
            loss = (loss_hit + cfg.mse_weight * loss_mse + loss_std
                    + beta * (neg_entropy + prior_energy)).mean()
            ctx.step(loss / self.n_voxels, opt_vae)
            out.update(loss_vae=float(loss.detach()) / self.n_voxels,
                       loss_hit=float(loss_hit.detach().mean()) / self.n_voxels,
                       loss_mse=float(loss_mse.detach().mean()) / self.n_voxels,
                       kl_entropy_term=float(neg_entropy.detach().mean()),
                       kl_energy_term=float(prior_energy.detach().mean()),
                       kl_beta=beta, tau=tau)
            lr, sweeps = cfg.lr_rbm, cfg.gibbs_steps_train

        positive = self._full(code, hard)
        self._keep_for_health(positive, ctx.epoch)
        for group in opt_rbm.param_groups:
            group["lr"] = lr
        negative = self._advance_chains(sweeps, positive.device)
        loss_cd = self.rbm.cd_loss(positive, negative)
        ctx.step(loss_cd, opt_rbm)
        with torch.no_grad():
            chain_energy = float(self.rbm.energy(negative).mean())
        out.update(loss_cd=float(loss_cd.detach()), chain_energy=chain_energy,
                   posterior_mean=float(hard.mean()))
        return out

    # ---- health ---------------------------------------------------------------------------
    def epoch_metrics(self, ctx: TrainContext) -> dict[str, float]:
        """RBM health after an epoch, on every rank with the same collectives in the same
        order: moments of the posterior and RBM samples are averaged over ranks first.

        xcorr_post_k_m / xcorr_rbm_k_m: Frobenius norm of the correlation block between
        partitions k and m, / sqrt(n_k n_m) (the RMS correlation), for this epoch's
        encoder posterior samples and for RBM samples clamped to the same energy codes
        (seed 003's partition study: a prior whose partitions do not talk shows ~0 off
        partition 0). corr_gap_k: RMS difference of the two correlation matrices over
        partition k's rows; corr_gap: over all. chain_energy_autocorr: lag-1
        autocorrelation of each chain's energy over the second half of a
        HEALTH_SWEEPS-sweep run (1: not mixing); chain_flip_rate: fraction of nodes that
        change per sweep; posterior_active: share of latent nodes whose posterior is not
        stuck at 0 or 1; energy_gap: mean RBM energy of posterior minus RBM samples.
        """
        post = self._post_buffer
        if post is None or self._buffer_epoch != ctx.epoch:
            return {}
        device = post.device
        P = self.config.n_partitions
        gen = torch.Generator(device=device).manual_seed(self._chain_seed + 7919 * (ctx.epoch + 1))
        start = (torch.rand(post.shape, generator=gen, device=device) < 0.5).float()
        start[:, 0] = post[:, 0]
        with torch.no_grad():
            rbm, trace, flips = self.rbm.gibbs(start, HEALTH_SWEEPS, gen, first=1, trace=True)
            energy_gap = float(self.rbm.energy(post).mean() - self.rbm.energy(rbm).mean())
        assert trace is not None
        assert flips is not None
        flip_rate = float(flips[HEALTH_SWEEPS // 2:].mean())  # after burn-in
        tail = trace[HEALTH_SWEEPS // 2:]  # (T, B)
        centred = tail - tail.mean(0)
        var = centred.square().mean(0)
        lag1 = (centred[1:] * centred[:-1]).mean(0) / var.clamp(min=1e-12)
        autocorr = torch.where(var > 1e-12, lag1, torch.ones_like(lag1)).mean()

        def moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = z.flatten(1).float()
            return ctx.all_reduce_mean(flat.mean(0)), ctx.all_reduce_mean(flat.T @ flat / len(flat))

        def correlation(mean: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            cov = second - torch.outer(mean, mean)
            std = cov.diagonal().clamp(min=0).sqrt()
            ok = std > 1e-6  # a constant node (a saturated code bit) correlates with nothing
            corr = cov / torch.outer(std.clamp(min=1e-6), std.clamp(min=1e-6))
            return torch.where(torch.outer(ok, ok), corr, torch.zeros_like(corr))

        post_mean, post_second = moments(post)
        corr_post = correlation(post_mean, post_second)
        corr_rbm = correlation(*moments(rbm))
        scalars = ctx.all_reduce_mean(torch.tensor([flip_rate, float(autocorr), energy_gap],
                                                   dtype=torch.float32, device=device))
        n = self.config.nodes_per_partition
        out: dict[str, float] = {}
        for k, m in self.rbm.pairs():
            rows, cols = slice(k * n, (k + 1) * n), slice(m * n, (m + 1) * n)
            out[f"xcorr_post_{k}_{m}"] = float(corr_post[rows, cols].norm() / n)
            out[f"xcorr_rbm_{k}_{m}"] = float(corr_rbm[rows, cols].norm() / n)
        gap = corr_post - corr_rbm
        gap.fill_diagonal_(0.0)
        for k in range(P):
            out[f"corr_gap_{k}"] = float(gap[k * n:(k + 1) * n].square().mean().sqrt())
        out["corr_gap"] = float(gap.square().mean().sqrt())
        latent_mean = post_mean[n:]
        out["posterior_active"] = float(((latent_mean > 0.01) & (latent_mean < 0.99)).float().mean())
        out["chain_flip_rate"] = float(scalars[0])
        out["chain_energy_autocorr"] = float(scalars[1])
        out["energy_gap"] = float(scalars[2])
        if out["chain_flip_rate"] < FROZEN_FLIP_RATE:
            raise TrialPruned(
                f"RBM prior frozen: {out['chain_flip_rate']:.1e} of latent nodes flip per Gibbs sweep "
                f"(< {FROZEN_FLIP_RATE:g}), so generated latents are not samples of the prior")
        return out

    # ---- sampling -------------------------------------------------------------------------
    def validation_sample_kwargs(self) -> dict[str, Any]:
        """Fewer Gibbs sweeps for per-epoch validation, if ``gibbs_steps_validation`` asks."""
        steps = self.config.gibbs_steps_validation
        if 0 < steps < self.config.gibbs_steps_sample:
            return {"gibbs_steps": steps}
        return {}

    @torch.no_grad()
    def sample(
        self, conditions: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """One shower per row: the energy code clamps partition 0, ``gibbs_steps`` block
        sweeps from a uniform random start sample the other partitions at inverse
        temperature ``sample_beta``, the decoder gives hit probabilities (Bernoulli) and
        hit energies u ~ N(decoded mean, per-voxel std). MeV, >= 0; chunked to bound memory."""
        unknown = sorted(set(kwargs) - {"gibbs_steps"})
        if unknown:
            raise TypeError(f"atlas_qvae.sample() knows only gibbs_steps, but got {unknown}")
        steps = int(kwargs.get("gibbs_steps", self.config.gibbs_steps_sample))
        was_training = self.training
        self.eval()
        device = self.rbm.bias.device
        draw_on = generator.device if generator is not None else device
        energy = conditions["energy"].to(device).float()
        P, n = self.config.n_partitions, self.config.nodes_per_partition
        pieces = []
        for i in range(0, len(energy), SAMPLE_CHUNK):
            e = energy[i:i + SAMPLE_CHUNK]
            start = torch.rand((len(e), P, n), generator=generator, device=draw_on).to(device)
            z = (start < 0.5).float()
            z[:, 0] = self.energy_code(e)
            z, _, _ = self.rbm.gibbs(z, steps, generator, first=1, beta=self.config.sample_beta)
            hit_logit, value, log_total = self.decode(z, self._energy_unit(e))
            u = torch.rand(hit_logit.shape, generator=generator, device=draw_on).to(device)
            hits = (u < torch.sigmoid(hit_logit)).float()
            eps = torch.randn(value.shape, generator=generator, device=draw_on).to(device)
            value = value + eps * self.value_log_std.exp()
            fraction = VALUE_EPS * torch.expm1(value.clamp(0.0, MAX_U) * _LOG_RANGE)
            shower = hits * fraction
            if self.config.renormalise:
                total = shower.sum(1, keepdim=True)
                target = log_total.clamp(max=math.log(MAX_TOTAL)).exp()[:, None]
                shower = torch.where(total > 0, shower * target / total.clamp(min=1e-30), shower)
            pieces.append(shower * e[:, None])
        self.train(was_training)
        cells = torch.cat(pieces) if pieces else torch.zeros(0, self.n_voxels, device=device)
        return {self.part: cells}


def build(config: Config, detector: Any) -> AtlasQVAE:
    """The model for a detector; only ``part_sizes`` and ``conditions`` are read."""
    return AtlasQVAE(config, dict(detector.part_sizes), tuple(detector.conditions))


__all__ = ["DETECTORS", "PHASE_PARAMS", "SAMPLING_PARAMS", "AtlasQVAE", "Config", "PartitionedRBM", "build"]
