"""The contract every model family must keep, checked for every registered family.

One parametrised suite over (family, detector) for every family in the registry and every
detector it declares in ``DETECTORS`` (names or name prefixes). A new family is tested by
its registry line; its tiny settings come from ``search_spaces/<family>_tiny.yaml``
(``geometry`` and ``fixed``) when that file exists, so the suite stays fast on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from calotune.artifacts import load_model, save_model
from calotune.data.splits import split
from calotune.detectors import detector_names, get_detector
from calotune.errors import UserError
from calotune.models.base import POINTS_OUTPUT, GenerativeModel, Phase, TrainContext, allocate_epochs
from calotune.models.registry import build_model, family_names, get_family, make_config
from calotune.sampling import as_sample
from calotune.spec import TRAINER_PARAMS, default_objective
from calotune.tuning import worker
from calotune.tuning.worker import TRAIN_STATE, TrialContext, make_step_fn, train

ROOT = Path(__file__).resolve().parents[1]


def _tiny_space(family: str) -> dict[str, Any]:
    path = ROOT / "search_spaces" / f"{family}_tiny.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _cases() -> list[tuple[str, str]]:
    cases = []
    for family in family_names():
        declared = get_family(family).DETECTORS
        for name in detector_names():
            if any(name == d or name.startswith(d) for d in declared):
                cases.append((family, name))
    return cases


CASES = _cases()


def _family_cases() -> list[tuple[str, str]]:
    """One (family, detector) per family: its tiny space's detector, else its first case.

    The checkpoint and two-rank tests check the trainer's contract with the family (the
    same code on every detector); they run once per family, the shape tests on every
    detector. Each spawns processes or trains whole epochs: the suite must stay fast on
    2 cores as families are added.
    """
    out = []
    for family in family_names():
        own = [c for c in CASES if c[0] == family]
        tiny = _tiny_space(family).get("detector")
        out.append(next((c for c in own if c[1] == tiny), own[0]))
    return out


FAMILY_CASES = _family_cases()


@dataclasses.dataclass
class Setup:
    family: str
    detector_name: str
    geometry: dict[str, Any]
    params: dict[str, Any]
    batch_size: int

    @property
    def detector(self) -> Any:
        return get_detector(self.detector_name, **self.geometry)

    def model(self, seed: int = 0) -> GenerativeModel:
        torch.manual_seed(seed)
        return build_model(self.family, self.params, self.detector)

    def data(self, n: int = 240, seed: int = 3):
        return split(self.detector.synthesize(n, seed=seed), seed=0)

    def ctx(self, max_epochs: int) -> TrialContext:
        return TrialContext(family=self.family, detector=self.detector_name, geometry=self.geometry,
                            objectives=(default_objective(self.detector),), max_epochs=max_epochs,
                            seed=11, fixed={**self.params, "batch_size": self.batch_size},
                            validation_batch=32)


def _setup(family: str, name: str) -> Setup:
    space = _tiny_space(family)
    geometry = space.get("geometry", {}) if space.get("detector") == name else {}
    fixed = space.get("fixed", {})
    params = {k: v for k, v in fixed.items() if k not in TRAINER_PARAMS}
    return Setup(family, name, geometry, params, int(fixed.get("batch_size", 32)))


@pytest.fixture(params=CASES, ids=[f"{f}-{d}" for f, d in CASES])
def setup(request: pytest.FixtureRequest) -> Setup:
    return _setup(*request.param)


@pytest.fixture(params=FAMILY_CASES, ids=[f"{f}-{d}" for f, d in FAMILY_CASES])
def family_setup(request: pytest.FixtureRequest) -> Setup:
    return _setup(*request.param)


def model_config(s: Setup) -> Any:
    return make_config(s.family, s.params)


def _plain_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _tensors(batch: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, torch.Tensor]]:
    return {g: {k: torch.from_numpy(v) for k, v in d.items()} for g, d in batch.items()}


def _prepared(s: Setup, data) -> GenerativeModel:
    model = s.model()
    model.load_preparation(model.prepare(data.train))
    return model


# ---- build, train, phases --------------------------------------------------------------
def test_build_and_two_training_steps(setup: Setup) -> None:
    data = setup.data()
    model = _prepared(setup, data)
    opts = model.make_optimizers()
    before = [p.detach().clone() for p in model.parameters()]
    for i, phase in enumerate(allocate_epochs(model.phases(), len(model.phases()))):
        batch = _tensors(data.train.batch_arrays(np.arange(i * 16, i * 16 + 16)))
        ctx = TrainContext(step=_plain_step, phase=phase[0].name, global_step=i)
        for _ in range(2):
            losses = model.train_step(batch, opts, ctx)
            assert losses and all(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.ndim == 0
                                                           and not v.requires_grad) for v in losses.values())
            assert all(np.isfinite(float(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_phases_are_valid_and_fill_the_budget(setup: Setup) -> None:
    phases = setup.model().phases()
    for max_epochs in (len(phases), len(phases) + 5):
        schedule = allocate_epochs(phases, max_epochs)
        assert len(schedule) == max_epochs
        assert schedule[-1][0].scoreable
        assert {p.name for p, _ in schedule} == {p.name for p in phases}


def test_allocate_epochs_splits_by_share_and_refuses_bad_schedules() -> None:
    pre, main = Phase("autoencoder", 1.0, scoreable=False), Phase("prior", 3.0)
    names = [p.name for p, _ in allocate_epochs([pre, main], 8)]
    assert names == ["autoencoder"] * 2 + ["prior"] * 6
    assert [k for _, k in allocate_epochs([pre, main], 3)] == [0, 0, 1]
    for phases, epochs in (([], 3), ([main, pre], 4), ([pre, main], 1), ([Phase("a", 0.0)], 2),
                           ([Phase("a"), Phase("a")], 2)):
        with pytest.raises(ValueError):
            allocate_epochs(phases, epochs)


# ---- preparation and saved models ------------------------------------------------------
def test_preparation_round_trips_through_saved_model(setup: Setup, tmp_path: Path) -> None:
    data = setup.data()
    model = _prepared(setup, data)
    save_model(tmp_path / "m", model, family=setup.family, detector=setup.detector, params=setup.params)
    loaded, _, _ = load_model(tmp_path / "m")
    want, got = model.preparation(), loaded.preparation()
    assert set(want) == set(got)
    for k, v in want.items():
        assert torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got[k]
    cond = {k: torch.from_numpy(v[:8]) for k, v in data.validation.conditions.items()}
    a = model.sample(cond, torch.Generator().manual_seed(5))
    b = loaded.sample(cond, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preparation_tensors_and_values_are_stored_without_pickles(setup: Setup, tmp_path: Path) -> None:
    """A preparation with data-dependent shapes and JSON values survives save/load (every family
    inherits the mechanism from GenerativeModel)."""
    model = setup.model()
    model.load_preparation({"hist": torch.arange(7, dtype=torch.float32), "bins": [0.0, 1.5], "norm": 2.0})
    save_model(tmp_path / "m", model, family=setup.family, detector=setup.detector, params=setup.params)
    loaded, _, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded.prepared.hist, torch.arange(7, dtype=torch.float32))
    assert loaded.prepared.json == {"bins": [0.0, 1.5], "norm": 2.0}


def test_samples_have_the_detector_shapes_and_vary(setup: Setup) -> None:
    data = setup.data()
    model = _prepared(setup, data)
    n = 16
    cond = {k: torch.from_numpy(v[:n]) for k, v in data.validation.conditions.items()}
    out = model.sample(cond, torch.Generator().manual_seed(0))
    if setup.detector.shower_kind == "points":
        assert set(out) == set(POINTS_OUTPUT)
        hits, offsets = out["hits"], out["offsets"]
        assert hits.ndim == 2 and hits.shape[1] == 4 and offsets.dtype == torch.int64
        assert offsets.shape == (n + 1,) and offsets[0] == 0 and offsets[-1] == len(hits)
        assert (offsets.diff() >= 0).all() and 4 * offsets.diff().max() <= setup.detector.part_sizes["hits"]
        assert torch.isfinite(hits).all() and (hits[:, 3] >= 0).all() and hits[:, 3].sum() > 0
        cloud = as_sample({k: v.numpy() for k, v in cond.items()}, out)
        assert len(np.unique(np.round(cloud.total_energy(), 3))) > 1
        fast = model.sample(cond, torch.Generator().manual_seed(0), **model.validation_sample_kwargs())
        assert set(fast) == set(POINTS_OUTPUT) and fast["offsets"].shape == (n + 1,)
        return
    assert {k: tuple(v.shape) for k, v in out.items()} == {p: (n, c) for p, c in setup.detector.part_sizes.items()}
    cells = torch.cat([v.reshape(n, -1) for v in out.values()], dim=1)
    assert torch.isfinite(cells).all() and (cells >= 0).all()
    assert cells.sum() > 0 and torch.unique(cells, dim=0).shape[0] > 1
    fast = model.sample(cond, torch.Generator().manual_seed(0), **model.validation_sample_kwargs())
    assert {k: v.shape for k, v in fast.items()} == {k: v.shape for k, v in out.items()}


def test_epoch_metrics_are_finite_floats(setup: Setup) -> None:
    model = _prepared(setup, setup.data())
    metrics = model.epoch_metrics(TrainContext(step=_plain_step))
    assert all(isinstance(k, str) and k.isidentifier() for k in metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values()), metrics


def test_declared_search_on_a_registered_model_is_consistent(setup: Setup) -> None:
    """SAMPLING_PARAMS and PHASE_PARAMS name Config fields and phases that exist, and a
    sampling parameter never changes a weight's shape (the parent's weights must load)."""
    module = get_family(setup.family)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    sampling = tuple(getattr(module, "SAMPLING_PARAMS", ()))
    phase_params = dict(getattr(module, "PHASE_PARAMS", {}))
    assert set(sampling) <= fields
    assert all(set(v) <= fields for v in phase_params.values())
    assert set(phase_params) <= {p.name for p in setup.model().phases()}
    model = setup.model()
    config = dataclasses.asdict(model_config(setup))
    for name in sampling:  # another legal value of each sampling parameter
        value = config[name]
        if isinstance(value, bool):
            candidates: list[Any] = [not value]
        elif isinstance(value, int):
            candidates = [value + 1, value - 1]
        elif isinstance(value, float):
            candidates = [value * 0.5, value * 1.5, value + 0.1]
        else:
            continue
        for candidate in candidates:
            try:
                make_config(setup.family, {**setup.params, name: candidate})
            except UserError:
                continue
            other = build_model(setup.family, {**setup.params, name: candidate}, setup.detector)
            other.load_preparation(model.preparation())
            other.inherit(model, ())  # strict by default: raises if a shape changed
            assert {k: v.shape for k, v in other.state_dict().items()} == \
                {k: v.shape for k, v in model.state_dict().items()}
            break


# ---- checkpoints -----------------------------------------------------------------------
class _Interrupt(Exception):
    pass


def test_restored_checkpoint_takes_the_same_next_step_bit_for_bit(family_setup: Setup, tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, checkpoint, a fresh process state, restore, 1 epoch."""
    setup = family_setup
    data = setup.data()
    epochs = max(2, len(setup.model().phases()) + 1)
    ctx = setup.ctx(epochs)
    epochs_seen: dict[str, int] = {}

    def keep(tag: str, stop_after: int | None = None):
        def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
            assert "calotune_failed" not in metrics, metrics
            epoch = epochs_seen[tag] = epochs_seen.get(tag, 0) + 1
            if checkpoint is not None:
                shutil.copytree(checkpoint, tmp_path / f"{tag}-{epoch}")
            if stop_after is not None and epoch == stop_after:
                raise _Interrupt
        return report

    train(ctx, {}, data, keep("straight"), device=torch.device("cpu"))
    straight = torch.load(tmp_path / f"straight-{epochs}" / TRAIN_STATE, weights_only=True)
    with pytest.raises(_Interrupt):
        train(ctx, {}, data, keep("cut", stop_after=epochs - 1), device=torch.device("cpu"))
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    np.random.seed(6789)
    epochs_seen["resumed"] = epochs - 1
    train(ctx, {}, data, keep("resumed"), device=torch.device("cpu"),
          resume_dir=tmp_path / f"cut-{epochs - 1}")
    resumed = torch.load(tmp_path / f"resumed-{epochs}" / TRAIN_STATE, weights_only=True)
    assert straight["model"].keys() == resumed["model"].keys()
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert str(straight["optimizers"]) == str(resumed["optimizers"])
    assert straight["rng"][0]["numpy"] == resumed["rng"][0]["numpy"]
    assert straight["global_step"] == resumed["global_step"]


# ---- two ranks (gloo on CPU) -----------------------------------------------------------
def _rank_main(rank: int, s: Setup, store: str, out: str) -> None:
    """Child process: (1) the first update's averaged gradients, (2) a whole worker epoch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data = s.data()
        model = _prepared(s, data)
        opts = model.make_optimizers()
        recorded: list[list[torch.Tensor]] = []
        real_step = opts[0].step

        def record_then_step(*args: Any, **kwargs: Any) -> Any:
            if not recorded:
                recorded.append([p.grad.detach().clone() for g in opts[0].param_groups for p in g["params"]])
            return real_step(*args, **kwargs)

        opts[0].step = record_then_step  # type: ignore[method-assign]
        half = _tensors(data.train.batch_arrays(np.arange(rank * 16, rank * 16 + 16)))
        torch.manual_seed(99)
        phase = model.phases()[0].name
        model.train_step(half, opts, TrainContext(step=make_step_fn(2, 0.0), phase=phase, rank=rank,
                                                  world_size=2))
        mean = worker._all_reduce_mean(2)(torch.tensor([float(rank)]))

        captured: list[GenerativeModel] = []
        build = worker.build_model

        def capture(*args: Any, **kwargs: Any) -> GenerativeModel:
            captured.append(build(*args, **kwargs))
            return captured[-1]

        worker.build_model = capture  # only in this child process
        results: list[dict[str, Any]] = []
        train(s.ctx(len(model.phases())), {}, data,
              lambda m, c: results.append(dict(m)), device=torch.device("cpu"))
        torch.save({"grads": recorded[0], "mean": mean,
                    "state": {k: v.clone() for k, v in captured[0].state_dict().items()},
                    "results": [{k: v for k, v in r.items() if isinstance(v, float | int)} for r in results]},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_average_gradients_and_end_identical(family_setup: Setup, tmp_path: Path) -> None:
    setup = family_setup
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(setup, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["mean"], torch.tensor([0.5]))
    # the same reference in one process: the mean of each half's gradients
    data = setup.data()
    per_half = []
    for rank in (0, 1):
        model = _prepared(setup, data)
        opts = model.make_optimizers()
        grads: list[torch.Tensor] = []

        class Done(Exception):
            pass

        def first_grads(loss: torch.Tensor, opt: torch.optim.Optimizer, grads: list = grads) -> None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads += [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for g in opt.param_groups for p in g["params"]]
            raise Done

        torch.manual_seed(99)
        half = _tensors(data.train.batch_arrays(np.arange(rank * 16, rank * 16 + 16)))
        with pytest.raises(Done):
            model.train_step(half, opts, TrainContext(step=first_grads, phase=model.phases()[0].name))
        per_half.append(grads)
    for got0, got1, a, b in zip(r0["grads"], r1["grads"], *per_half, strict=True):
        torch.testing.assert_close(got0, (a + b) / 2, rtol=1e-5, atol=1e-6)
        assert torch.equal(got0, got1)
    # a whole worker epoch under DDP: identical weights on both ranks, scores on rank 0
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    objective = default_objective(setup.detector)[0]
    assert objective in r0["results"][-1] and objective not in r1["results"][-1]


def test_deepcopy_of_a_prepared_model_keeps_the_preparation(setup: Setup) -> None:
    model = setup.model()
    model.load_preparation({"scale": torch.ones(3), "note": "x"})
    clone = copy.deepcopy(model)
    assert torch.equal(clone.prepared.scale, torch.ones(3)) and clone.prepared.json == {"note": "x"}
