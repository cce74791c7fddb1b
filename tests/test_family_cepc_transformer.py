"""The CEPC cell transformer (``cepc_transformer``): sequences, losses, sampling, collapse.

The conformance suite checks the family contract; these tests check what is particular
to this family. Tiny model, ~200 coarse showers (~50 cells each): CPU only.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.detectors.cepc.geometry import cell_indices
from calotune.models import cepc_transformer as family
from calotune.models.base import TrainContext, TrialPruned
from calotune.models.registry import build_model, validate_params
from calotune.pointclouds import PointCloudSet
from calotune.sampling import as_sample

TINY = {"width": 16, "n_heads": 2, "n_layers": 1, "max_cells": 96}
COARSE = {"cell_mm": 60.0, "threshold_mev": 50.0}


@pytest.fixture(scope="module")
def detector():
    return get_detector("cepc-ecal", **COARSE)


@pytest.fixture(scope="module")
def data(detector):
    return split(detector.synthesize(180, seed=3), seed=0)


def _model(detector, data, **params):
    torch.manual_seed(0)
    model = build_model("cepc_transformer", {**TINY, **params}, detector)
    model.load_preparation(model.prepare(data.train))
    return model


def _batch(cloud: PointCloudSet, idx) -> dict:
    arrays = cloud.batch_arrays(np.asarray(idx))
    return {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in arrays.items()}


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_config_rules_and_declared_params() -> None:
    with pytest.raises(ValueError, match="width % n_heads"):
        family.Config(width=30, n_heads=4)
    with pytest.raises(ValueError, match="scheduled_sampling"):
        family.Config(scheduled_sampling=1.5)
    names = {f.name for f in dataclasses.fields(family.Config)}
    assert set(family.SAMPLING_PARAMS) <= names
    assert all(set(v) <= names for v in family.PHASE_PARAMS.values())
    phases = family.build(family.Config(), get_detector("cepc-ecal")).phases()
    assert set(family.PHASE_PARAMS) == {p.name for p in phases}
    validate_params("cepc_transformer", {"stop_mode": "learned", "temperature": 0.5})


def test_sampling_params_never_change_a_shape(detector) -> None:
    base = build_model("cepc_transformer", TINY, detector).state_dict()
    other = build_model("cepc_transformer", {**TINY, "temperature": 0.3, "energy_temperature": 0.0,
                                             "stop_mode": "learned", "stop_threshold": 2.0}, detector).state_dict()
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in other.items()}


def test_training_sequences_are_energy_sorted_and_near_the_axis(detector, data) -> None:
    model = _model(detector, data)
    batch = _batch(data.train, np.arange(16))
    cells = model._cells(batch)
    y, kept, n = cells["y"], cells["kept"], cells["n"]
    assert (n > 0).all() and (kept.sum(1) == n).all()
    assert ((y[:, 1:] <= y[:, :-1]) | ~kept[:, 1:]).all()  # decreasing energy
    w = model.config.window
    dz, dphi = cells["dz"] - w, cells["dphi"] - w
    # the most energetic cell sits on (or next to) the particle's axis
    assert (dz[:, 0].abs() <= 1).float().mean() > 0.8 and (dphi[:, 0].abs() <= 1).float().mean() > 0.8
    real = batch["cells"]["mask"].sum(1)
    assert ((n <= real) & (n >= 0.9 * real)).all()  # a few far-off cells at most are dropped


def test_losses_fall_on_a_fixed_batch(detector, data) -> None:
    model = _model(detector, data, lr=3e-3)
    opts = model.make_optimizers()
    batch = _batch(data.train, np.arange(32))
    first = model.train_step(batch, opts, TrainContext(step=_step))
    for _ in range(25):
        last = model.train_step(batch, opts, TrainContext(step=_step, epoch=1))  # with scheduled sampling
    assert last["loss_positions"] < first["loss_positions"] - 0.5
    assert last["loss_energy"] < first["loss_energy"]
    assert all(np.isfinite(v) for v in last.values())
    assert last["scheduled_sampling"] == model.config.scheduled_sampling and first["scheduled_sampling"] == 0.0


@pytest.mark.parametrize("stop_mode", ["threshold", "learned"])
def test_samples_are_cell_lists_whose_total_tracks_the_incident_energy(detector, data, stop_mode: str) -> None:
    model = _model(detector, data, stop_mode=stop_mode)
    cond = {k: torch.from_numpy(v) for k, v in data.validation.conditions.items()}
    out = model.sample(cond, torch.Generator().manual_seed(1))
    gen = as_sample(data.validation.conditions, out)
    assert len(gen) == len(data.validation) and (gen.hits[:, 3] >= 0).all()
    ratio = gen.total_energy() / gen.conditions["energy"]
    # E_vis is drawn first and the cells are rescaled to it: even untrained, the total follows E_inc
    assert 0.6 < ratio.mean() < 1.4 and ratio.std() < 0.3
    g = detector.geometry
    layer, iz, iphi, inside = cell_indices(g, gen.hits[:, :3])
    assert inside.all()
    event = np.repeat(np.arange(len(gen)), gen.counts)
    key = ((event * g.n_layers + layer) * g.n_z_cells + iz) * g.n_phi_cells + iphi
    assert len(np.unique(key)) == len(key)  # a cell written twice is one hit
    again = model.sample(cond, torch.Generator().manual_seed(1))
    assert torch.equal(again["hits"], out["hits"])


def test_temperature_zero_energy_noise_and_cold_positions_shrink_diversity(detector, data) -> None:
    warm = _model(detector, data)
    cold = _model(detector, data, temperature=0.05, energy_temperature=0.0)
    cold.load_state_dict(warm.state_dict())
    assert cold.collapse_metrics()["first_cell_spread"] < warm.collapse_metrics()["first_cell_spread"]


def _collapse(model) -> None:
    """Make every cell land on one position: the seed's mode collapse, by hand."""
    with torch.no_grad():
        for head in (model.head_layer, model.head_dz[1], model.head_dphi[1]):
            head.weight.zero_()
            head.bias.fill_(-30.0)
            head.bias[head.bias.shape[0] // 2] = 30.0


def test_collapse_detector_prunes_with_the_reason(detector, data) -> None:
    model = _model(detector, data)
    healthy = model.epoch_metrics(TrainContext(step=_step))
    assert healthy["repeated_cells"] < 0.5 and healthy["duplicate_events"] < 0.5
    _collapse(model)
    with pytest.raises(TrialPruned) as info:
        model.epoch_metrics(TrainContext(step=_step))
    assert "mode collapse" in info.value.reason and "repeat a cell" in info.value.reason
    unchecked = _model(detector, data, collapse_check=False)
    _collapse(unchecked)
    health = unchecked.epoch_metrics(TrainContext(step=_step))
    assert health["repeated_cells"] > 0.5 and health["first_cell_spread"] < 0.2


@pytest.mark.slow
def test_tiny_search_registers_a_model_that_generates(tmp_path: Path, detector) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=900)
    search = run("calotune.search", "cepc_transformer_tiny")
    assert search.returncode == 0, search.stderr[-4000:]
    name = next(line.split("'")[1] for line in search.stderr.splitlines() if "registered model" in line)
    out = tmp_path / "gen.h5"
    gen = run("calotune.generate", f"models:/{name}@candidate", "--events", "40", "--out", str(out))
    assert gen.returncode == 0, gen.stderr[-4000:]
    cloud = detector.read(out)
    assert len(cloud) == 40 and (cloud.counts > 0).all()
    ratio = cloud.total_energy() / cloud.conditions["energy"]
    assert 0.6 < ratio.mean() < 1.4
