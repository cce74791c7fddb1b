"""The hgcal_score family: SDEs, mean-field attention on packed hits, the hits-per-event
model, the samplers, the search-facing declarations, and (slow) a search then a
sampler-only search on its registered model. The family conformance suite covers the
shared contract (checkpoints, DDP, saved models)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.models import hgcal_score
from calotune.models.base import TrainContext
from calotune.models.hgcal_score import SDE, Config, HGCalScore, MeanFieldBlock, build, segment_softmax
from calotune.models.registry import ParamError, validate_params
from calotune.spec import load_spec

TINY = {"n_blocks": 1, "n_heads": 2, "embed_dim": 16, "hidden_dim": 16, "sampling_steps": 4}
GEOMETRY = {"n_layers": 4, "nx": 6, "ny": 6}


@pytest.fixture(scope="module")
def detector():
    return get_detector("hgcal", **GEOMETRY)


@pytest.fixture(scope="module")
def data(detector):
    return split(detector.synthesize(300, seed=2), 0.2, 0.2, seed=0)


def _model(detector, data, **params) -> HGCalScore:
    torch.manual_seed(0)
    model = build(Config(**{**TINY, **params}), detector)
    model.load_preparation(model.prepare(data.train))
    return model


def _batch(data, n: int = 32) -> dict:
    arrays = data.train.batch_arrays(np.arange(n))
    return {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in arrays.items()}


def _plain_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ---- configuration and declarations ---------------------------------------------------
@pytest.mark.parametrize("params, rule", [
    ({"embed_dim": 30, "n_heads": 4}, "embed_dim % n_heads"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min < sigma_max"),
    ({"beta_min": 2.0, "beta_max": 1.0}, "beta_min < beta_max"),
    ({"snr": 0.0}, "snr"),
    ({"sampler": "euler"}, "sampler"),
])
def test_config_refuses_what_cannot_run(params: dict, rule: str) -> None:
    with pytest.raises(ParamError, match=re.escape(rule)):
        validate_params("hgcal_score", params)


def test_sampling_and_phase_params_are_fields_and_sampling_changes_no_shape(detector) -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(hgcal_score.SAMPLING_PARAMS) <= names
    assert set(hgcal_score.PHASE_PARAMS) == {p.name for p in build(Config(**TINY), detector).phases()}
    assert all(set(v) <= names for v in hgcal_score.PHASE_PARAMS.values())
    assert not set(hgcal_score.SAMPLING_PARAMS) & {n for v in hgcal_score.PHASE_PARAMS.values() for n in v}
    torch.manual_seed(0)
    base = build(Config(**TINY), detector).state_dict()
    torch.manual_seed(0)
    other = build(Config(**{**TINY, "sampling_steps": 50}, sampler="ode", corrector_steps=3, snr=0.3,
                         validation_step_fraction=1.0), detector).state_dict()
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in other.items()}
    assert all(torch.equal(v, other[k]) for k, v in base.items())


def test_shipped_spaces_load_and_use_physics_objectives() -> None:
    main = load_spec("hgcal_score")
    assert main.objective.metric == "mean_separation"
    whens = {p.name: p.when for p in main.params}
    assert whens["sigma_max"] == {"sde": "ve"} and whens["beta_max"] == {"sde": "vp"}
    assert {"n_blocks", "n_heads", "embed_dim", "hidden_dim", "batch_size", "lr", "dropout",
            "sampling_steps", "corrector_steps", "fourier_scale", "sde"} <= set(whens)
    sampler = load_spec("hgcal_score_sampler")
    assert [o.metric for o in sampler.objectives] == ["mean_separation", "gen_time_ms"]
    assert {p.name for p in sampler.params} <= set(hgcal_score.SAMPLING_PARAMS)
    assert load_spec("hgcal_score_tiny").detector == "hgcal"


def test_build_refuses_a_grid_detector() -> None:
    with pytest.raises(ValueError, match="point clouds"):
        build(Config(**TINY), get_detector("zdc", ecal_nx=2, ecal_ny=2, hcal_nx=2, hcal_ny=2, hcal_nz=2))


# ---- SDEs and attention ---------------------------------------------------------------
def test_sde_marginals_match_their_coefficients() -> None:
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    vp = SDE(Config(sde="vp"))
    mean, std = vp.marginal(t)
    torch.testing.assert_close(mean**2 + std**2, torch.ones_like(t))
    f, g = vp.coefficients(t)
    # d/dt log mean = f; d/dt std^2 = g^2 - 2 beta/2 std^2 ... checked numerically
    h = 1e-5
    dlog = (torch.log(vp.marginal(t + h)[0]) - torch.log(vp.marginal(t - h)[0])) / (2 * h)
    torch.testing.assert_close(dlog, f, rtol=1e-4, atol=1e-6)
    ve = SDE(Config(sde="ve", sigma_min=0.01, sigma_max=50.0))
    _, s = ve.marginal(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([0.01, 50.0], dtype=torch.float64))
    _, g = ve.coefficients(t)
    dvar = (ve.marginal(t + h)[1] ** 2 - ve.marginal(t - h)[1] ** 2) / (2 * h)
    torch.testing.assert_close(dvar, g**2, rtol=1e-4, atol=1e-6)
    assert ve.prior_std == 50.0 and vp.prior_std == 1.0


def test_segment_softmax_and_mean_field_block_are_per_event_and_order_free() -> None:
    torch.manual_seed(0)
    seg = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.randn(6, 2)
    w = segment_softmax(logits, seg, 4)
    sums = torch.zeros(4, 2).index_add_(0, seg, w)
    torch.testing.assert_close(sums[:3], torch.ones(3, 2))
    assert torch.equal(sums[3], torch.zeros(2))  # an event without hits
    block = MeanFieldBlock(8, 16, 2, 0.0).eval()
    h, cls = torch.randn(6, 8), torch.randn(4, 8)
    out_h, out_cls = block(h, cls, seg)
    perm = torch.tensor([2, 0, 1, 4, 3, 5])  # shuffle hits inside their events
    p_h, p_cls = block(h[perm], cls, seg[perm])
    torch.testing.assert_close(p_h, out_h[perm])
    torch.testing.assert_close(p_cls, out_cls)
    # event 0's outputs ignore event 1's hits
    h2 = h.clone()
    h2[3:5] += 5.0
    torch.testing.assert_close(block(h2, cls, seg)[0][:3], out_h[:3])


# ---- preparation: the hits-per-event model ------------------------------------------------
def test_hits_per_event_follow_incident_energy(data) -> None:
    detector = get_detector("hgcal")
    full = split(detector.synthesize(600, seed=5), 0.1, 0.1, seed=0)
    model = _model(detector, full)
    energy = torch.from_numpy(full.train.conditions["energy"])
    counts = model.draw_counts(energy, torch.Generator().manual_seed(0)).numpy()
    real = full.train.counts
    e = full.train.conditions["energy"]
    for lo, hi in ((0.0, 0.25), (0.75, 1.0)):
        band = (e >= np.quantile(e, lo)) & (e <= np.quantile(e, hi))
        assert counts[band].mean() == pytest.approx(real[band].mean(), rel=0.15)
    high = e > np.quantile(e, 0.75)
    assert counts[high].mean() > 2.5 * counts[e < np.quantile(e, 0.25)].mean()
    assert counts.min() >= 1 and counts.max() <= model.prepared.json["max_hits"]
    pitch = model.prepared.pitch.numpy()
    np.testing.assert_allclose(pitch, [15.0, 15.0, 24.0])  # the default geometry's lattice


# ---- training and sampling -------------------------------------------------------------
def test_training_lowers_the_denoising_loss(detector, data) -> None:
    model = _model(detector, data, lr=3e-3)
    opts = model.make_optimizers()
    batch = _batch(data)
    torch.manual_seed(1)
    first = np.mean([model.train_step(batch, opts, TrainContext(step=_plain_step))["loss_dsm"] for _ in range(5)])
    for _ in range(40):
        model.train_step(batch, opts, TrainContext(step=_plain_step))
    last = np.mean([model.train_step(batch, opts, TrainContext(step=_plain_step))["loss_dsm"] for _ in range(5)])
    assert last < 0.8 * first


def test_correlation_loss_enters_only_with_its_weight(detector, data) -> None:
    batch = _batch(data)
    out = {}
    for weight in (0.0, 10.0):
        model = _model(detector, data, corr_loss_weight=weight)
        torch.manual_seed(3)
        out[weight] = model.train_step(batch, model.make_optimizers(), TrainContext(step=lambda loss, opt: None))
    assert out[0.0]["loss"] == pytest.approx(out[0.0]["loss_dsm"])
    assert out[0.0]["loss_cor"] > 0
    assert out[10.0]["loss"] == pytest.approx(out[10.0]["loss_dsm"] + 10.0 * out[10.0]["loss_cor"], rel=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"sampler": "ode"}, {"corrector_steps": 0, "steps": 3},
                                    {"sampler": "pc", "corrector_steps": 2, "snr": 0.3}])
def test_sample_is_a_point_cloud_per_event_and_reproducible(detector, data, kwargs: dict) -> None:
    model = _model(detector, data, sde="ve", sigma_max=10.0)
    cond = {"energy": torch.from_numpy(data.validation.conditions["energy"][:12])}
    out = model.sample(cond, torch.Generator().manual_seed(4), **kwargs)
    assert set(out) == {"hits", "offsets"}
    hits, offsets = out["hits"], out["offsets"]
    assert offsets.dtype == torch.int64 and offsets.shape == (13,) and offsets[0] == 0
    assert offsets[-1] == len(hits) and (offsets.diff() >= 1).all()
    assert hits.shape[1] == 4 and torch.isfinite(hits).all() and (hits[:, 3] >= 0).all()
    again = model.sample(cond, torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(again["hits"], hits) and torch.equal(again["offsets"], offsets)
    counts = model.draw_counts(cond["energy"], torch.Generator().manual_seed(4))
    assert torch.equal(offsets.diff(), counts)  # counts come first from the same stream


def test_sample_refuses_unknown_knobs_and_validation_is_cheaper(detector, data) -> None:
    model = _model(detector, data, sampling_steps=40, validation_step_fraction=0.25)
    assert model.validation_sample_kwargs() == {"steps": 10}
    assert _model(detector, data, sampling_steps=40, validation_step_fraction=1.0).validation_sample_kwargs() == {}
    assert _model(detector, data, sampling_steps=6, validation_step_fraction=0.1).validation_sample_kwargs() == \
        {"steps": 4}
    cond = {"energy": torch.tensor([2e4])}
    with pytest.raises(TypeError, match="temperature"):
        model.sample(cond, temperature=0.5)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(cond, sampler="heun")


# ---- end to end: a search, then a sampler-only search on its registered model ---------------
def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_search_then_sampler_only_search_on_the_registered_model(tmp_path: Path) -> None:
    proc = _run(["calotune.search", "hgcal_score_tiny", "--trials", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    name = re.search(r"registered model '([^']+)' version", proc.stderr + proc.stdout)
    assert name, proc.stderr[-3000:]
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    tiny = (root / "hgcal_score_tiny.yaml").read_text()
    space = tmp_path / "sampler.yaml"
    geometry = re.search(r"^geometry: .*$", tiny, re.M).group(0)
    data = re.search(r"^data: .*$", tiny, re.M).group(0)
    space.write_text(
        "name: hgcal_score_tiny_sampler\nfamily: hgcal_score\ndetector: hgcal\n"
        f"{geometry}\n{data}\nbase_model: models:/{name.group(1)}@candidate\n"
        "objectives:\n  - {metric: mean_separation, mode: min}\n  - {metric: gen_time_ms, mode: min}\n"
        "select: knee\nbudget: {trials: 3}\nscheduler: {type: none}\nresources: {cpus_per_trial: 1}\n"
        "params:\n  sampler: {type: categorical, choices: [pc, ode]}\n"
        "  sampling_steps: {type: int, low: 2, high: 6, step: 2}\n"
        "fixed: {validation_step_fraction: 1.0}\n")
    second = _run(["calotune.search", str(space)], cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / '.calotune' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{name.group(1)}'")
    assert len(versions) == 2
    child = max(versions, key=lambda v: int(v.version))
    assert "calotune.parent_model" in child.tags
