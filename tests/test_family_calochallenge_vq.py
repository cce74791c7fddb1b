"""The Calo-VQ family (calotune.models.calochallenge_vq): its own rules beyond the
conformance suite, which runs it on datasets 1-photons, 1-pions and 2 with the tiny
settings of search_spaces/calochallenge_vq_tiny.yaml.

Unit tests on a tiny model (64 codes, 8 tokens) and 240 synthetic dataset-1 photons;
the chained two-step search (``slow``) runs the real command line: a tiny search, a
prior-only search on the model it registered, a sampling-only search on that, and
generation in the CaloChallenge layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.models import calochallenge_vq as vq
from calotune.models.base import TrainContext, TrialPruned
from calotune.models.registry import build_model
from calotune.tuning.worker import PRUNED_KEY, TrialContext, train

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = "calochallenge-1-photons"
TINY = {k: v for k, v in yaml.safe_load((ROOT / "search_spaces" / "calochallenge_vq_tiny.yaml")
                                        .read_text())["fixed"].items() if k != "batch_size"}


def _plain_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def data():
    return split(get_detector(DETECTOR).synthesize(240, seed=3), seed=0)


def _model(data, seed: int = 0, **overrides: Any) -> vq.VQModel:
    torch.manual_seed(seed)
    model = build_model("calochallenge_vq", {**TINY, **overrides}, get_detector(DETECTOR))
    model.load_preparation(model.prepare(data.train))
    return model


def _batch(split_set, rows: np.ndarray) -> dict[str, dict[str, torch.Tensor]]:
    arrays = split_set.batch_arrays(rows)
    return {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in arrays.items()}


def _conditions(split_set, n: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[:n]) for k, v in split_set.conditions.items()}


def _nearest(points: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Largest coordinate difference of each point to its closest row of ``among`` (exact)."""
    return (points[:, None] - among[None]).abs().amax(2).min(1).values


# ---- configuration -------------------------------------------------------------------
@pytest.mark.parametrize("values, words", [
    ({"gpt_width": 30, "gpt_heads": 4}, "gpt_width % gpt_heads == 0"),
    ({"codebook_size": 16, "top_k": 17}, "top_k <= codebook_size"),
    ({"r_levels": 4096, "r_tokens": 3}, "r_levels ** r_tokens <= 2**24"),
])
def test_config_refuses_rules_between_fields(values: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        vq.Config(**values)


def test_declared_search_params_are_config_fields_and_split_by_phase() -> None:
    fields = {f.name for f in dataclasses.fields(vq.Config)}
    assert set(vq.SAMPLING_PARAMS) == {"temperature", "top_k"}
    ae, prior = set(vq.PHASE_PARAMS["autoencoder"]), set(vq.PHASE_PARAMS["prior"])
    assert ae <= fields and prior <= fields and not ae & prior
    assert not (ae | prior) & set(vq.SAMPLING_PARAMS)
    assert {"codebook_size", "n_tokens", "embed_dim", "beta", "disc_weight"} <= ae
    assert {"gpt_layers", "gpt_heads", "gpt_width"} <= prior


# ---- R tokens and the GPT ------------------------------------------------------------
def test_r_tokens_round_trip_within_one_bin(data) -> None:
    model = _model(data, r_tokens=2, r_levels=8)
    lo, hi = model.prepared.json["r_lo"], model.prepared.json["r_hi"]
    r = torch.linspace(lo, hi - 1e-6, 500)
    digits = model._r_digits(r)
    assert digits.shape == (500, 2) and digits.min() >= 0 and digits.max() < 8
    back = model._r_value(digits, torch.full((500,), 0.5))
    assert torch.all((back - r).abs() <= 0.5 * (hi - lo) / 64 + 1e-5)
    # out of range: clamped into the first and last bins, never a digit outside the vocabulary
    edge = model._r_digits(torch.tensor([lo - 1.0, hi + 1.0]))
    assert edge.tolist() == [[0, 0], [7, 7]]


def test_cached_greedy_generation_equals_the_teacher_forced_argmax(data) -> None:
    model = _model(data, gpt_layers=2)
    model.eval()
    prior = model.prior
    cond = model._cond(torch.from_numpy(data.validation.conditions["energy"][:12]).float())
    tokens = prior.generate(cond, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    k, r = model.config.codebook_size, model.config.r_tokens
    assert tokens.shape == (12, r + model.config.n_tokens)
    assert (tokens[:, :r] >= k).all() and (tokens[:, r:] < k).all()  # each position its own vocabulary
    with torch.no_grad():
        logits = prior(cond, tokens[:, :-1])
    assert torch.equal(logits.argmax(2), tokens)


def test_top_k_one_fixes_the_tokens_and_the_showers_keep_r_times_e(data) -> None:
    model = _model(data, top_k=1)
    cond = _conditions(data.validation, 16)
    feature = model._cond(cond["energy"].float())
    greedy = [model.prior.generate(feature, model.config.temperature, 1, torch.Generator().manual_seed(s))
              for s in (1, 2)]
    assert torch.equal(*greedy)  # top-k 1: the random draw no longer matters
    free = [model.prior.generate(feature, 1.0, 0, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(*free)
    a = model.sample(cond, torch.Generator().manual_seed(1))["showers"]
    r = a.sum(1) / cond["energy"]
    assert (r >= model.prepared.json["r_lo"] - 1e-4).all() and (r <= model.prepared.json["r_hi"] + 1e-4).all()
    # voxels under the readout threshold are zero, as in the data
    assert ((a == 0) | (a >= model.threshold_mev * (1 - 1e-5))).all()


def test_sampling_params_never_change_a_weights_shape(data) -> None:
    parent = _model(data)
    child = build_model("calochallenge_vq", {**TINY, "temperature": 0.7, "top_k": 5}, get_detector(DETECTOR))
    child.load_preparation(parent.preparation())
    child.load_state_dict(parent.state_dict())  # strict
    cond = _conditions(data.validation, 8)
    assert child.sample(cond, torch.Generator().manual_seed(0))["showers"].shape == (8, 368)


# ---- the codebook --------------------------------------------------------------------
def test_ema_update_moves_each_used_code_to_the_mean_of_its_vectors() -> None:
    torch.manual_seed(0)
    quantizer = vq.EMAQuantizer(8, 4, decay=0.0)
    z = torch.randn(64, 4)
    idx = quantizer.assign(z)
    quantizer.update(z, idx, lambda t: t)
    for code in idx.unique().tolist():
        torch.testing.assert_close(quantizer.codebook[code], z[idx == code].mean(0), rtol=1e-3, atol=1e-4)


def test_epoch_metrics_report_usage_and_prune_a_collapsed_codebook(data) -> None:
    model = _model(data, min_code_usage=0.1)  # 64 codes: at least 7 must be used
    q = model.quantizer
    ctx = TrainContext(step=_plain_step, phase="autoencoder", epoch=2)
    assert model.epoch_metrics(ctx) == {}  # no training batch this epoch (sampling-only)
    q.epoch_counts.fill_(3.0)
    metrics = model.epoch_metrics(ctx)
    assert metrics["code_perplexity"] == pytest.approx(64.0) and metrics["dead_codes"] == 0.0
    assert metrics["code_usage"] == 1.0 and q.epoch_counts.sum() == 0  # reset for the next epoch
    q.epoch_counts[:7] = 5.0
    assert model.epoch_metrics(ctx)["dead_codes"] == 57.0
    q.epoch_counts[[3, 9, 40]] = torch.tensor([100.0, 1.0, 1.0])
    with pytest.raises(TrialPruned) as info:
        model.epoch_metrics(ctx)
    reason = info.value.reason
    assert reason.startswith("codebook collapsed: 3 of 64 codes used in epoch 3") and "min_code_usage=0.1" in reason


def test_dead_codes_restart_on_encoder_outputs_across_a_checkpoint(data) -> None:
    model = _model(data)
    q = model.quantizer
    q.epoch_counts[:10] = 1.0  # 54 codes unused this epoch
    model.epoch_metrics(TrainContext(step=_plain_step, phase="autoencoder"))
    state = model.training_state()
    assert int(state["pending_restart"].sum()) == 54
    resumed = _model(data)
    resumed.load_state_dict(model.state_dict())
    resumed.load_training_state(state)
    dead = state["pending_restart"]
    batch = _batch(data.train, np.arange(32))
    with torch.no_grad():
        _, _, cond, v = resumed._inputs(batch)
        z = resumed._encode(v, cond).reshape(-1, resumed.config.embed_dim)
    q = resumed.quantizer
    q.restart(dead, z, TrainContext(step=_plain_step))
    assert _nearest(q.codebook[dead], z).max() == 0  # every restarted code is an encoder output
    resumed.load_training_state(state)
    resumed.train_step(batch, resumed.make_optimizers(), TrainContext(step=_plain_step, phase="autoencoder"))
    assert resumed.training_state()["pending_restart"].sum() == 0  # consumed by the first step


def test_restarted_codes_are_identical_on_every_rank() -> None:
    """Two ranks (threads, a real barrier-based mean) restart from different batches and
    end with the same codebook: rank 0's picks."""
    world = 2
    barrier, slots = threading.Barrier(world), [None] * world

    def mean_for(rank: int):
        def mean(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            out = sum(slots) / world
            barrier.wait()
            return out
        return mean

    quantizers = []
    batches = [torch.randn(50, 4, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    for _ in range(world):
        torch.manual_seed(0)
        quantizers.append(vq.EMAQuantizer(8, 4, 0.99))

    def run(rank: int) -> None:
        ctx = TrainContext(step=_plain_step, all_reduce_mean=mean_for(rank), rank=rank, world_size=world)
        quantizers[rank].restart(dead, batches[rank], ctx)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(quantizers[0].codebook, quantizers[1].codebook)
    assert _nearest(quantizers[0].codebook[dead], batches[0]).max() == 0


# ---- step 2 on a registered model ----------------------------------------------------
def test_inherit_keeps_the_autoencoder_and_starts_a_fresh_wider_prior(data) -> None:
    parent = _model(data, seed=1, gpt_width=16, gpt_layers=1)
    with torch.no_grad():  # a trained-looking parent: its prior is not the child's init
        for p in parent.prior.parameters():
            p.add_(1.0)
    child = build_model("calochallenge_vq", {**TINY, "gpt_width": 32, "gpt_layers": 2},
                        get_detector(DETECTOR))
    child.load_preparation(parent.preparation())
    child.inherit(parent, ("prior",))
    theirs = parent.state_dict()
    for name, tensor in child.state_dict().items():
        if name.startswith("prior."):
            assert name not in theirs or tensor.shape != theirs[name].shape or not torch.equal(tensor, theirs[name])
        else:
            assert torch.equal(tensor, theirs[name]), name
    assert child.prior.head.in_features == 32 and len(child.prior.blocks) == 2
    # the frozen encoder gives the parent's codes, which the new prior now learns
    batch = _batch(data.train, np.arange(16))
    assert torch.equal(child._targets(batch)[1], parent._targets(batch)[1])
    with pytest.raises(ValueError, match="must also include 'prior'"):
        child.inherit(parent, ("autoencoder",))
    with pytest.raises(ValueError, match="phases 'autoencoder' and 'prior'"):
        child.inherit(parent, ("train",))


# ---- the trainer ---------------------------------------------------------------------
def _ctx(max_epochs: int, **fixed: Any) -> TrialContext:
    return TrialContext(family="calochallenge_vq", detector=DETECTOR, geometry={},
                        objectives=(("sep_mean", "min"), ("gen_time_ms", "min")), max_epochs=max_epochs,
                        seed=4, fixed={**TINY, "batch_size": 32, **fixed}, validation_batch=64)


def test_two_phase_trial_reports_health_every_epoch_and_scores_only_the_prior(data) -> None:
    results: list[dict[str, Any]] = []
    train(_ctx(4), {}, data, lambda m, c: results.append(dict(m)), device=torch.device("cpu"))
    assert len(results) == 4
    for epoch, metrics in enumerate(results):
        assert metrics["health_code_perplexity"] > 1 and 0 < metrics["health_code_usage"] <= 1
        assert ("sep_mean" in metrics) == (epoch >= 2), metrics  # autoencoder epochs are not scored
    assert "train_loss_pixel" in results[0] and "train_loss_prior" in results[-1]
    assert results[-1]["train_loss_prior"] < results[2]["train_loss_prior"]
    assert math.isfinite(results[-1]["sep_mean"]) and results[-1]["gen_time_ms"] > 0


def test_a_collapsed_codebook_ends_the_trial_as_pruned_with_the_reason(data) -> None:
    results: list[dict[str, Any]] = []
    # 168 training showers x 8 tokens can never use 90 % of 2048 codes
    train(_ctx(2, codebook_size=2048, min_code_usage=0.9), {}, data,
          lambda m, c: results.append(dict(m)), device=torch.device("cpu"))
    (last,) = results
    assert set(last) == {PRUNED_KEY}
    assert last[PRUNED_KEY].startswith("codebook collapsed: ") and "of 2048 codes used in epoch 1" in last[PRUNED_KEY]


@pytest.mark.gpu
def test_samples_on_a_gpu(data) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _model(data).cuda()
    cond = _conditions(data.validation, 64)
    out = model.sample(cond, torch.Generator().manual_seed(0))["showers"]
    assert out.is_cuda and out.shape == (64, 368) and torch.isfinite(out).all() and (out >= 0).all()
    ratio = (out.sum(1) / cond["energy"].cuda()).cpu()
    assert (ratio > 0).all()


# ---- for real: two steps, chained by lineage -----------------------------------------
@pytest.mark.slow
def test_chained_prior_and_sampling_searches_on_the_registered_model(tmp_path: Path) -> None:
    from tests.helpers import mlflow_client, registered_name, run_cli

    home = tmp_path / "home"
    first = run_cli(["calotune.search", "calochallenge_vq_tiny", "--trials", "2", "--home", str(home)],
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    name = registered_name("calochallenge_vq_tiny")
    client = mlflow_client(home)
    parent_version = client.get_model_version_by_alias(name, "candidate").version
    common = {"family": "calochallenge_vq", "detector": DETECTOR, "data": {"events": 400, "seed": 1},
              "base_model": f"models:/{name}@candidate", "scheduler": {"type": "none"},
              "resources": {"cpus_per_trial": 1}}
    prior = tmp_path / "vq_prior.yaml"
    prior.write_text(yaml.safe_dump({
        "name": "vq_prior", **common, "train_phases": ["prior"], "budget": {"trials": 2, "max_epochs": 1},
        "params": {"gpt_width": {"type": "categorical", "choices": [16, 32]},
                   "lr_prior": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
        "fixed": {"batch_size": 32}}))
    second = run_cli(["calotune.search", str(prior), "--home", str(home)], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    label = f"{name}/{parent_version}"
    runs = client.search_runs([client.get_experiment_by_name("vq_prior").experiment_id], max_results=50)
    trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
    assert len(trials) == 2 and all(t.data.tags["calotune.parent_model"] == label for t in trials)
    child = client.get_model_version_by_alias(name, "candidate")
    assert int(child.version) > int(parent_version)
    assert child.tags["calotune.parent_model"] == label and child.tags["train_phases"] == "prior"

    sampling = tmp_path / "vq_sampling.yaml"
    sampling.write_text(yaml.safe_dump({
        "name": "vq_sampling", **common, "budget": {"trials": 2},
        "params": {"temperature": {"type": "float", "low": 0.8, "high": 1.1},
                   "top_k": {"type": "int", "low": 0, "high": 32, "step": 8}}}))
    third = run_cli(["calotune.search", str(sampling), "--home", str(home)], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-4000:]
    grandchild = client.get_model_version_by_alias(name, "candidate")
    assert grandchild.tags["calotune.parent_model"] == f"{name}/{child.version}"

    out = tmp_path / "gen.h5"
    gen = run_cli(["calotune.generate", f"models:/{name}@candidate", "--events", "50", "--out", str(out),
                   "--home", str(home)], cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-4000:]
    with h5py.File(out, "r") as f:  # the CaloChallenge layout, as the official evaluation reads it
        assert f["incident_energies"].shape == (50, 1) and f["showers"].shape == (50, 368)
        assert f["showers"].dtype == np.float64
        assert np.all(f["showers"][...] >= 0) and np.all(f["showers"][...].sum(1) > 0)
