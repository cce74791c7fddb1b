"""Tests of the ZDC SwiGLU family on a tiny stand-in detector (fast, CPU only)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from calotune.models import zdc_swiglu
from calotune.models.base import TrainContext
from calotune.models.registry import make_config
from calotune.models.zdc_swiglu import (
    MAX_VISIBLE_FRACTION,
    Config,
    MoEFFN,
    SwiGLUGate,
    ZDCSwiGLU,
    build,
)

DETECTOR = SimpleNamespace(
    part_sizes={"ecal": 16, "hcal": 48}, conditions=("energy", "theta", "phi"), name="zdc"
)
SMALL = {"noise_dim": 4, "hidden_width": 16, "n_layers": 1, "low_rank": 4, "critic_width": 16}


def tiny_model(**overrides: object) -> ZDCSwiGLU:
    torch.manual_seed(0)
    return build(Config(**{**SMALL, **overrides}), DETECTOR)


def conditions(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "energy": 1e3 + torch.rand(n, generator=g) * 3e5,  # MeV, up to 300 GeV
        "theta": torch.rand(n, generator=g) * 0.01,
        "phi": (torch.rand(n, generator=g) * 2 - 1) * torch.pi,
    }


def real_batch(n: int, seed: int = 0) -> dict:
    """Sparse showers with ~4 % visible energy, split 1:3 between ECAL and HCAL."""
    g = torch.Generator().manual_seed(seed)
    cond = conditions(n, seed)
    cells = {}
    for part, size, share in (("ecal", 16, 0.01), ("hcal", 48, 0.03)):
        hit = torch.rand(n, size, generator=g) < 0.2
        w = torch.rand(n, size, generator=g) * hit
        w[:, 0] += 0.1  # at least one hit per event
        cells[part] = w / w.sum(1, keepdim=True) * (share * cond["energy"])[:, None]
    return {"conditions": cond, "cells": cells}


def plain_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


PLAIN = TrainContext(step=plain_step)


# ---- outputs ------------------------------------------------------------------------
def test_sample_shapes_nonnegative_finite_and_sparse() -> None:
    model = tiny_model()
    out = model.sample(conditions(32), torch.Generator().manual_seed(1))
    assert set(out) == {"ecal", "hcal"}
    assert out["ecal"].shape == (32, 16) and out["hcal"].shape == (32, 48)
    cells = torch.cat([out["ecal"], out["hcal"]], dim=1)
    assert torch.isfinite(cells).all() and (cells >= 0).all()
    assert (cells == 0).float().mean() > 0.5  # the hard mask leaves exact zeros
    assert ((cells > 0).sum(1) >= 1).all()  # every event deposits somewhere


def test_energy_conservation_is_exact() -> None:
    model = tiny_model()
    cond = conditions(64)
    feats = model.condition_features(cond)
    with torch.no_grad():
        out = model._generate(feats, cond["energy"], *model._noise(64, None))
    total = out["cells"]["ecal"].sum(1) + out["cells"]["hcal"].sum(1)
    torch.testing.assert_close(total, out["fraction"] * cond["energy"], rtol=1e-5, atol=1e-3)
    assert ((out["fraction"] > 0) & (out["fraction"] < MAX_VISIBLE_FRACTION)).all()
    # sample() goes through the same layer: visible fraction in the plausible range.
    s = model.sample(cond, torch.Generator().manual_seed(0))
    frac = (s["ecal"].sum(1) + s["hcal"].sum(1)) / cond["energy"]
    assert ((frac > 0) & (frac < MAX_VISIBLE_FRACTION)).all()


def test_empty_mask_falls_back_to_one_cell_and_keeps_energy() -> None:
    model = tiny_model()
    with torch.no_grad():
        for path in model.paths.values():
            path.mask_head.bias.fill_(-1e3)  # p = 0: the hard mask drops every cell
    cond = conditions(8)
    out = model.sample(cond)
    cells = torch.cat([out["ecal"], out["hcal"]], dim=1)
    assert ((cells > 0).sum(1) == 1).all()
    frac = cells.sum(1) / cond["energy"]
    assert torch.isfinite(frac).all() and (frac > 0).all()


def test_zero_energy_event_gives_zero_cells() -> None:
    model = tiny_model()
    cond = conditions(4)
    cond["energy"][0] = 0.0
    out = model.sample(cond)
    assert out["ecal"][0].sum() == 0 and out["hcal"][0].sum() == 0
    assert torch.isfinite(out["hcal"]).all()


def test_noise_varies_showers_and_seed_reproduces_them() -> None:
    model = tiny_model()
    cond = conditions(16)
    a = model.sample(cond, torch.Generator().manual_seed(7))
    b = model.sample(cond, torch.Generator().manual_seed(7))
    c = model.sample(cond, torch.Generator().manual_seed(8))
    assert torch.equal(a["hcal"], b["hcal"]) and torch.equal(a["ecal"], b["ecal"])
    assert not torch.equal(a["hcal"], c["hcal"])
    # Same conditions in every row, different noise per row: rows differ.
    same = {k: v[:1].repeat(16) for k, v in cond.items()}
    rows = model.sample(same, torch.Generator().manual_seed(0))["hcal"]
    assert torch.unique(rows, dim=0).shape[0] == 16


def test_sample_is_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    cond = conditions(10)
    whole = model.sample(cond, torch.Generator().manual_seed(3))
    monkeypatch.setattr(zdc_swiglu, "SAMPLE_CHUNK", 3)
    chunked = model.sample(cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(whole["hcal"], chunked["hcal"])


def test_sample_restores_training_mode() -> None:
    model = tiny_model(dropout=0.5)
    model.train()
    model.sample(conditions(2))
    assert model.training


# ---- SwiGLU gate --------------------------------------------------------------------
def test_gate_mix_reproduces_slide_example() -> None:
    a = torch.tensor([0.8, 0.6, 0.4])
    b = torch.tensor([0.2, 0.3, 0.1])
    sigma = torch.tensor([0.7, 0.3, 0.9])
    torch.testing.assert_close(SwiGLUGate.mix(a, b, sigma), torch.tensor([0.62, 0.39, 0.37]))


@pytest.mark.parametrize("sigma", [1.0, 0.0, 0.5])
def test_gate_forced_sigma_selects_mask_value_or_mean(sigma: float) -> None:
    torch.manual_seed(0)
    gate = SwiGLUGate(rank=8, n_cells=5)
    mask, value = torch.rand(3, 5), torch.rand(3, 5) * 4
    a = gate.proj_a(mask[..., None])  # (3, 5, 8)
    b = gate.proj_b(value[..., None])
    expected = gate.proj_out(sigma * a + (1 - sigma) * b).squeeze(-1)
    torch.testing.assert_close(gate(mask, value, sigma=torch.tensor(sigma)), expected)
    if sigma == 1.0:  # output ignores the value map entirely
        torch.testing.assert_close(gate(mask, value * 0, sigma=torch.tensor(1.0)), expected)


def test_gate_learned_sigma_matches_literal_formula() -> None:
    torch.manual_seed(1)
    gate = SwiGLUGate(rank=8, n_cells=5)
    torch.nn.init.normal_(gate.cell_gate_bias)
    mask, value = torch.rand(3, 5), torch.rand(3, 5) * 4
    a, b = gate.proj_a(mask[..., None]), gate.proj_b(value[..., None])
    logits = gate.proj_gate(torch.stack([mask, value], -1)) + gate.cell_gate_bias.T
    expected = gate.proj_out(SwiGLUGate.mix(a, b, torch.sigmoid(logits))).squeeze(-1)
    torch.testing.assert_close(gate(mask, value), expected)


# ---- mixture of experts -------------------------------------------------------------
def test_moe_routes_each_event_to_exactly_top_k_experts() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(width=8, n_experts=5, top_k=2)
    x = torch.randn(20, 8)
    weights, routed, aux = moe.route(x)
    assert (routed.sum(1) == 2).all()
    assert ((weights > 0) == routed).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(20))
    assert torch.isfinite(aux) and aux > 0
    rows_seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda _m, inp, _o: rows_seen.append(inp[0].shape[0]))
    out, _ = moe(x)
    assert sum(rows_seen) == 20 * 2  # sparse dispatch: k expert evaluations per event
    expected = sum(weights[:, e, None] * moe.experts[e](x) for e in range(5))
    torch.testing.assert_close(out, expected)


# ---- config -------------------------------------------------------------------------
def test_config_rejects_top_k_above_experts_with_rule_and_values() -> None:
    with pytest.raises(ValueError) as err:
        Config(moe_top_k=3, moe_experts=2)
    assert str(err.value) == (
        "moe_top_k <= moe_experts must hold, but got moe_top_k=3, moe_experts=2"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_width", 0, "hidden_width > 0 must hold, but got hidden_width=0"),
        ("lr_critic", -1e-3, "lr_critic > 0 must hold, but got lr_critic=-0.001"),
        ("mask_loss_weight", -0.5, "mask_loss_weight >= 0 must hold, but got"),
        ("dropout", 1.0, "0 <= dropout < 1 must hold, but got dropout=1.0"),
    ],
)
def test_config_validation_messages(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Config(**{field: value})


def test_registry_builds_the_family() -> None:
    cfg = make_config("zdc_swiglu", SMALL)
    assert isinstance(build(cfg, DETECTOR), ZDCSwiGLU)
    assert zdc_swiglu.DETECTORS == ("zdc",)


def test_build_requires_an_energy_condition() -> None:
    det = SimpleNamespace(part_sizes={"ecal": 4}, conditions=("theta",))
    with pytest.raises(ValueError, match="conditions must include 'energy'"):
        build(Config(**SMALL), det)


# ---- training -----------------------------------------------------------------------
@pytest.mark.parametrize("use_moe", [False, True])
def test_train_step_finite_losses_and_updates_both_networks(use_moe: bool) -> None:
    model = tiny_model(use_moe=use_moe, critic_steps=2)
    opts = model.make_optimizers()
    critic_before = [p.detach().clone() for p in model.critic.parameters()]
    gen_before = [p.detach().clone() for p in model.paths.parameters()]
    calls = []

    def step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        calls.append(opt)
        plain_step(loss, opt)

    losses = model.train_step(real_batch(32), opts, TrainContext(step=step))
    assert calls == [opts[0], opts[0], opts[1]]  # critic_steps critic updates, then generator
    for key in ("loss_critic", "loss_generator", "loss_mask", "loss_value", "loss_energy"):
        # 0-d tensors, read by the trainer once per epoch (no host sync per step)
        assert isinstance(losses[key], torch.Tensor) and losses[key].ndim == 0, key
        assert not losses[key].requires_grad and losses[key] == losses[key], key
    assert all(torch.isfinite(torch.as_tensor(v)) for v in losses.values())
    if use_moe:
        assert losses["loss_moe_aux"] > 0
    after = list(model.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, after, strict=True))
    after = list(model.paths.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, after, strict=True))


def test_straight_through_scale_controls_the_mask_gradient() -> None:
    def mask_grad(straight_through: float, temperature: float) -> torch.Tensor:
        model = tiny_model(
            mask_straight_through=straight_through,
            mask_temperature=temperature,
            mask_loss_weight=0.0,
            value_loss_weight=0.0,
            energy_loss_weight=0.0,
        )
        opts = model.make_optimizers()
        grads = []

        def step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
            plain_step(loss, opt)
            if opt is opts[1]:
                grads.append(model.paths["hcal"].mask_head.weight.grad.clone())

        model.train_step(real_batch(32), opts, TrainContext(step=step))
        return grads[0]

    # Without straight-through the mask head learns from the adversary only through the
    # gate input, so the relaxation's temperature cannot matter; with it, it does.
    torch.testing.assert_close(mask_grad(0.0, 0.5), mask_grad(0.0, 2.0))
    assert not torch.allclose(mask_grad(1.0, 0.5), mask_grad(0.0, 0.5))


def test_optimizers_split_parameters_between_critic_and_generator() -> None:
    model = tiny_model()
    critic_opt, gen_opt = model.make_optimizers()
    critic = {id(p) for g in critic_opt.param_groups for p in g["params"]}
    gen = {id(p) for g in gen_opt.param_groups for p in g["params"]}
    assert critic == {id(p) for p in model.critic.parameters()}
    assert not critic & gen and critic | gen == {id(p) for p in model.parameters()}
    assert critic_opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_supervised_losses_decrease_on_a_fixed_batch() -> None:
    model = tiny_model(adv_loss_weight=0.0, lr_generator=3e-3)
    opts = model.make_optimizers()
    batch = real_batch(64)
    first = model.train_step(batch, opts, PLAIN)
    for _ in range(40):
        last = model.train_step(batch, opts, PLAIN)
    assert last["loss_critic"] == 0.0  # adversarial part switched off entirely
    assert last["loss_mask"] < first["loss_mask"]
    assert last["loss_energy"] < first["loss_energy"]
    assert last["loss_value"] < first["loss_value"]


# ---- serialisation ------------------------------------------------------------------
def test_state_dict_round_trip_reproduces_samples() -> None:
    model = tiny_model(use_moe=True)
    opts = model.make_optimizers()
    model.train_step(real_batch(16), opts, PLAIN)
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fields = json.loads(json.dumps(dataclasses.asdict(model.config)))
    torch.manual_seed(123)  # a different init, overwritten by load_state_dict
    clone = build(Config(**fields), DETECTOR)
    clone.load_state_dict(state)
    cond = conditions(8)
    a = model.sample(cond, torch.Generator().manual_seed(5))
    b = clone.sample(cond, torch.Generator().manual_seed(5))
    assert torch.equal(a["ecal"], b["ecal"]) and torch.equal(a["hcal"], b["hcal"])
