"""The ATLAS QVAE family: its RBM prior (energies, block Gibbs, the CD update through a torch
optimiser, checked by hand on a 4-node RBM), its schedules, phases, health metrics and a
tiny end-to-end search. The shared contract (checkpoints, DDP, saved models) is checked by
tests/test_conformance_families.py."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.models.atlas_qvae import (
    HEALTH_SAMPLES,
    AtlasQVAE,
    Config,
    PartitionedRBM,
)
from calotune.models.base import TrainContext, TrialPruned
from calotune.models.registry import build_model, make_config
from calotune.tuning.worker import make_step_fn

TINY = {"nodes_per_partition": 8, "encoder_width": 32, "decoder_width": 32, "encoder_layers": 1,
        "decoder_layers": 1, "n_chains": 32, "gibbs_steps_train": 2, "prior_gibbs_steps": 2,
        "gibbs_steps_sample": 20}


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny tensors: intra-op threads only contend (20x slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plain_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    detector = get_detector("atlas-regular", n_r=6, n_phi=4)
    return detector, split(detector.synthesize(300, seed=5), seed=0)


def _model(detector: object, data: object, **params: object) -> AtlasQVAE:
    torch.manual_seed(0)
    model = build_model("atlas_qvae", {**TINY, **params}, detector)
    model.load_preparation(model.prepare(data.train))
    return model


def _batch(data: object, lo: int, hi: int) -> dict:
    arrays = data.train.batch_arrays(np.arange(lo, hi))
    return {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in arrays.items()}


# ---- the RBM by hand: 4 partitions of one node ------------------------------------------
def _four_node_rbm() -> PartitionedRBM:
    rbm = PartitionedRBM(4, 1)
    with torch.no_grad():
        rbm.bias.copy_(torch.tensor([[0.1], [-0.2], [0.3], [0.0]]))
        for key, w in {"0_1": 0.5, "0_2": -0.3, "0_3": 0.2, "1_2": 0.4, "1_3": -0.1, "2_3": 0.25}.items():
            rbm.weights[key].fill_(w)
    return rbm


def _states(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[:, :, None]  # (B, P=4, n=1)


DATA = [[1, 0, 1, 1], [0, 1, 1, 0]]
CHAINS = [[1, 1, 0, 0], [0, 0, 0, 1]]
# <v>_data - <v>_chains, and <v_k v_l>_data - <v_k v_l>_chains, worked out on paper:
# data means (0.5, 0.5, 1, 0.5), chain means (0.5, 0.5, 0, 0.5); pair means of the data
# 01: 0, 02: .5, 03: .5, 12: .5, 13: 0, 23: .5; of the chains 01: .5, all others 0.
CD_BIAS = [0.0, 0.0, 1.0, 0.0]
CD_WEIGHT = {"0_1": -0.5, "0_2": 0.5, "0_3": 0.5, "1_2": 0.5, "1_3": 0.0, "2_3": 0.5}


def test_energy_and_conditional_field_match_the_formulas_by_hand() -> None:
    rbm = _four_node_rbm()
    # E(1,0,1,1) = -(0.1 + 0.3 + 0) - (W02 + W03 + W23) = -0.4 - 0.15
    # E(0,1,1,0) = -(-0.2 + 0.3) - W12 = -0.1 - 0.4
    torch.testing.assert_close(rbm.energy(_states(DATA)), torch.tensor([-0.55, -0.5]))
    # field of node 2 given (1, 0, ., 1): b2 + W02 + W23 = 0.3 - 0.3 + 0.25
    z = _states([[1, 0, 0, 1]])
    torch.testing.assert_close(rbm.field(z, 2), torch.tensor([[0.25]]))
    # field of node 0 given (., 1, 1, 1): b0 + W01 + W02 + W03 = 0.1 + 0.5 - 0.3 + 0.2
    torch.testing.assert_close(rbm.field(_states([[0, 1, 1, 1]]), 0), torch.tensor([[0.5]]))


def test_cd_surrogate_gradient_is_minus_the_hand_computed_cd_statistic() -> None:
    rbm = _four_node_rbm()
    rbm.cd_loss(_states(DATA), _states(CHAINS)).backward()
    torch.testing.assert_close(rbm.bias.grad[:, 0], -torch.tensor(CD_BIAS))
    for key, value in CD_WEIGHT.items():
        torch.testing.assert_close(rbm.weights[key].grad, torch.tensor([[-value]]), msg=key)


def test_cd_update_through_the_trainers_step_and_sgd_is_the_hand_computed_one() -> None:
    """theta <- theta + lr * CD statistic, via the very ctx.step the trainer hands out."""
    rbm = _four_node_rbm()
    before_b = rbm.bias.detach().clone()
    before_w = {k: float(w.detach()) for k, w in rbm.weights.items()}
    opt = torch.optim.SGD(rbm.parameters(), lr=0.1)
    make_step_fn(1, grad_clip=10.0)(rbm.cd_loss(_states(DATA), _states(CHAINS)), opt)
    torch.testing.assert_close(rbm.bias.detach()[:, 0], before_b[:, 0] + 0.1 * torch.tensor(CD_BIAS))
    for key, value in CD_WEIGHT.items():
        assert float(rbm.weights[key].detach()) == pytest.approx(before_w[key] + 0.1 * value, abs=1e-7), key


def test_first_adam_step_of_the_family_moves_each_parameter_by_lr_along_the_cd_sign() -> None:
    """The family's own RBM optimiser (Adam) on the CD gradient: a first Adam step is
    lr * sign(g) (up to eps), zero where the statistic is zero."""
    rbm = _four_node_rbm()
    start = {k: v.detach().clone() for k, v in rbm.state_dict().items()}
    opt = torch.optim.Adam(rbm.parameters(), lr=0.01)
    make_step_fn(1, grad_clip=10.0)(rbm.cd_loss(_states(DATA), _states(CHAINS)), opt)
    moved = {k: v.detach() - start[k] for k, v in rbm.state_dict().items()}
    torch.testing.assert_close(moved["bias"][:, 0], 0.01 * torch.sign(torch.tensor(CD_BIAS)), atol=1e-6, rtol=0)
    for key, value in CD_WEIGHT.items():
        torch.testing.assert_close(moved[f"weights.{key}"], torch.tensor([[0.01 * float(np.sign(value))]]),
                                   atol=1e-6, rtol=0)


def _exact(rbm: PartitionedRBM, clamp: float | None = None) -> dict[tuple[int, ...], float]:
    """Boltzmann probabilities of the 16 states (or of the 8 with node 0 clamped)."""
    states = [s for s in itertools.product((0, 1), repeat=4) if clamp is None or s[0] == clamp]
    with torch.no_grad():
        weights = torch.exp(-rbm.energy(_states([list(s) for s in states])))
    return dict(zip(states, (weights / weights.sum()).tolist(), strict=True))


def _empirical(z: torch.Tensor) -> dict[tuple[int, ...], float]:
    keys, counts = np.unique(z[:, :, 0].numpy().astype(int), axis=0, return_counts=True)
    return {tuple(k): c / len(z) for k, c in zip(keys.tolist(), counts, strict=True)}


@pytest.mark.parametrize("clamp", [None, 1.0])
def test_block_gibbs_samples_the_exact_boltzmann_distribution(clamp: float | None) -> None:
    rbm = _four_node_rbm()
    with torch.no_grad():
        for w in rbm.weights.values():
            w.mul_(3.0)  # stronger couplings than at init, so a wrong conditional shows
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand((20000, 4, 1), generator=gen) < 0.5).float()
    first = 0
    if clamp is not None:
        z[:, 0] = clamp
        first = 1
    z, _, _ = rbm.gibbs(z, 25, gen, first=first)
    exact, seen = _exact(rbm, clamp), _empirical(z)
    tv = 0.5 * sum(abs(exact[s] - seen.get(s, 0.0)) for s in exact)
    assert set(seen) <= set(exact)
    assert tv < 0.02, (tv, exact, seen)  # 20k samples: statistical TV ~ 0.005


def test_pcd_through_adam_fits_a_known_rbm() -> None:
    """Persistent CD with the surrogate loss and Adam takes a zero-initialised 4-node RBM
    to the distribution of samples drawn exactly from a teacher RBM."""
    teacher = _four_node_rbm()
    exact = _exact(teacher)
    states = list(exact)
    gen = torch.Generator().manual_seed(1)
    student = PartitionedRBM(4, 1)
    with torch.no_grad():
        for p in student.parameters():
            p.zero_()
    tv_start = 0.5 * sum(abs(exact[s] - _exact(student)[s]) for s in states)
    opt = torch.optim.Adam(student.parameters(), lr=0.03)
    chains = (torch.rand((256, 4, 1), generator=gen) < 0.5).float()
    probs = torch.tensor([exact[s] for s in states])
    table = _states([list(s) for s in states])
    for _ in range(300):
        data = table[torch.multinomial(probs, 256, replacement=True, generator=gen)]
        chains, _, _ = student.gibbs(chains, 1, gen)
        make_step_fn(1, grad_clip=10.0)(student.cd_loss(data, chains), opt)
    tv_end = 0.5 * sum(abs(exact[s] - _exact(student)[s]) for s in states)
    assert tv_start > 0.1 and tv_end < 0.04, (tv_start, tv_end)


# ---- the family -------------------------------------------------------------------------
def test_config_refuses_a_temperature_that_rises_and_out_of_range_values() -> None:
    with pytest.raises(UserError, match="tau_end <= tau_start"):
        make_config("atlas_qvae", {"tau_start": 0.2, "tau_end": 0.5})
    with pytest.raises(UserError, match="n_partitions"):
        make_config("atlas_qvae", {"n_partitions": 1})
    with pytest.raises(UserError, match="relaxation"):
        make_config("atlas_qvae", {"relaxation": "softmax"})
    assert Config().n_partitions == 4


def test_schedules_anneal_linearly_then_hold() -> None:
    model = AtlasQVAE(Config(tau_start=1.0, tau_end=0.2, tau_anneal_steps=100, kl_weight=2.0,
                             kl_anneal_steps=50), {"showers": 10}, ("energy",))
    assert [model.temperature(s) for s in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert [model.kl_beta(s) for s in (0, 25, 50, 80)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    flat = AtlasQVAE(Config(tau_anneal_steps=0, kl_anneal_steps=0), {"showers": 10}, ("energy",))
    assert flat.temperature(0) == Config().tau_end and flat.kl_beta(0) == Config().kl_weight


def test_energy_code_is_a_monotone_thermometer_over_the_training_range() -> None:
    model = AtlasQVAE(Config(nodes_per_partition=16), {"showers": 10}, ("energy",))
    model.load_preparation({"log10_e_min": 3.0, "log10_e_max": 6.0})
    code = model.energy_code(torch.tensor([1e3, 10**4.5, 1e5, 1e6, 1e7]))
    assert code[0].sum() == 0 and code[-2].sum() == 16 and code[-1].sum() == 16
    counts = code.sum(1)
    assert (counts.diff() >= 0).all() and counts[1] == 8  # mid-range: half the nodes
    assert (code[:, :-1] >= code[:, 1:]).all()  # a thermometer: on-nodes come first


def test_prior_phase_trains_the_rbm_alone(tiny) -> None:
    detector, data = tiny
    model = _model(detector, data)
    opts = model.make_optimizers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = model.train_step(_batch(data, 0, 32), opts, TrainContext(step=_plain_step, phase="prior"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("rbm.") for k in changed), changed
    assert "loss_cd" in losses and "loss_vae" not in losses
    assert opts[1].param_groups[0]["lr"] == model.config.prior_lr


def test_vae_phase_updates_encoder_decoder_and_rbm_and_keeps_chains(tiny) -> None:
    detector, data = tiny
    model = _model(detector, data, lr_rbm=0.003)
    opts = model.make_optimizers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train_step(_batch(data, 0, 32), opts, TrainContext(step=_plain_step, phase="vae"))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder", "decoder", "rbm"} <= changed
    assert opts[1].param_groups[0]["lr"] == 0.003
    state = model.training_state()
    assert state["chains"].shape == (32, 4, 8) and set(state["chains"].unique().tolist()) <= {0.0, 1.0}
    # the chains continue from the saved state in a fresh model: same next negative phase
    twin = _model(detector, data, lr_rbm=0.003)
    twin.load_state_dict(model.state_dict())
    twin.load_training_state(state)
    a = model._advance_chains(3, torch.device("cpu"))
    b = twin._advance_chains(3, torch.device("cpu"))
    assert torch.equal(a, b)


def test_health_metrics_see_cross_partition_correlation(tiny) -> None:
    detector, data = tiny
    model = _model(detector, data, n_partitions=4)
    gen = torch.Generator().manual_seed(3)
    z = (torch.rand((HEALTH_SAMPLES, 4, 8), generator=gen) < 0.5).float()
    z[:, 2] = z[:, 1]  # partitions 1 and 2 of the posterior are copies of each other
    model._post_buffer, model._buffer_epoch = z, 0
    with torch.no_grad():
        model.rbm.weights["1_2"].copy_(4.0 * torch.eye(8))  # the prior couples them too
    health = model.epoch_metrics(TrainContext(step=_plain_step, epoch=0))
    n = 8
    # the block is the identity plus sampling noise of ~1/sqrt(512) off the diagonal
    assert health["xcorr_post_1_2"] == pytest.approx(1.0 / np.sqrt(n), rel=0.03)
    assert health["xcorr_post_1_3"] < 0.1 and health["xcorr_post_2_3"] < 0.1
    assert health["xcorr_rbm_1_2"] > 3 * health["xcorr_rbm_1_3"]
    assert 0 < health["chain_flip_rate"] <= 1 and -1 <= health["chain_energy_autocorr"] <= 1
    assert health["posterior_active"] == 1.0
    assert all(np.isfinite(v) for v in health.values())
    # another epoch without training: no samples, no numbers (and no collectives)
    assert model.epoch_metrics(TrainContext(step=_plain_step, epoch=1)) == {}


def test_a_frozen_sampler_prunes_the_trial(tiny) -> None:
    detector, data = tiny
    model = _model(detector, data)
    model._post_buffer = torch.zeros((64, 4, 8))
    model._buffer_epoch = 0
    with torch.no_grad():
        model.rbm.bias.fill_(-60.0)  # every node pinned off: nothing ever flips
    with pytest.raises(TrialPruned, match="frozen"):
        model.epoch_metrics(TrainContext(step=_plain_step, epoch=0))


def test_sampling_knobs_and_temperature(tiny) -> None:
    detector, data = tiny
    model = _model(detector, data, gibbs_steps_validation=5)
    assert model.validation_sample_kwargs() == {"gibbs_steps": 5}
    assert _model(detector, data).validation_sample_kwargs() == {}
    cond = {"energy": torch.from_numpy(data.validation.conditions["energy"][:40])}
    a = model.sample(cond, torch.Generator().manual_seed(0))
    b = model.sample(cond, torch.Generator().manual_seed(0), gibbs_steps=5)
    assert a["showers"].shape == b["showers"].shape == (40, detector.part_sizes["showers"])
    assert not torch.equal(a["showers"], b["showers"])
    with pytest.raises(TypeError, match="gibbs_steps"):
        model.sample(cond, torch.Generator().manual_seed(0), temperature=2.0)


def test_learning_moves_the_sample_towards_the_data(tiny) -> None:
    """A few dozen steps on a tiny model lower the reconstruction loss and bring the
    generated total energy towards the reference's."""
    detector, data = tiny
    model = _model(detector, data, lr_vae=3e-3)
    opts = model.make_optimizers()
    first = last = None
    step = 0
    for _ in range(6):
        for lo in range(0, len(data.train) - 31, 32):
            out = model.train_step(_batch(data, lo, lo + 32), opts,
                                   TrainContext(step=_plain_step, global_step=step, phase="vae"))
            step += 1
            first = first or out
            last = out
    assert last["loss_hit"] < first["loss_hit"]
    cond = {"energy": torch.from_numpy(data.validation.conditions["energy"])}
    cells = model.sample(cond, torch.Generator().manual_seed(0))["showers"].numpy()
    ref = data.validation.cells["showers"]
    e_inc = data.validation.conditions["energy"]
    ratio_gen, ratio_ref = (cells.sum(1) / e_inc).mean(), (ref.sum(1) / e_inc).mean()
    assert abs(ratio_gen - ratio_ref) < 0.25 * ratio_ref, (ratio_gen, ratio_ref)


# ---- a real search ---------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_search_registers_promotes_and_generates(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)

    search = run("calotune.search", "atlas_qvae_tiny", "--seed", "2")
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-5000:]
    assert "Pareto" in search.stderr or "pareto" in search.stderr
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / '.calotune' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    names = [m.name for m in client.search_registered_models()]
    model_name = next(n for n in names if n.startswith("atlas-regular"))
    trials = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                            max_results=50)
              if r.data.tags.get("calotune.kind") == "trial"]
    assert any(k.startswith("health_xcorr_post_0_1") for t in trials for k in t.data.metrics)
    promote = run("calotune.promote", model_name)
    assert promote.returncode == 0, promote.stderr[-3000:]
    out = tmp_path / "gen.h5"
    gen = run("calotune.generate", f"models:/{model_name}@production", "--events", "60", "--out", str(out))
    assert gen.returncode == 0, gen.stderr[-3000:]
    with h5py.File(out) as f:
        assert f["incident_energies"].shape == (60, 1)
        assert f["showers"].shape == (60, 7 * 4 * 6) and f["showers"].dtype == np.float64
        assert (f["showers"][:] >= 0).all() and f["showers"][:].sum() > 0
