"""Memory that scales: one copy of the sample in the driver, none per trial.

The driver reorders the read arrays in place into [train | validation | test] instead of
copying each split, frees every view of them once the object store holds the trial
data, and a trial indexes batches out of the (read-only, shared) arrays it gets from
the store: the only per-trial copies are one batch at a time and the validation subset.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch

from calotune.data import splits as splits_mod
from calotune.data.splits import (
    detach,
    empty_like,
    permute_rows,
    split,
    split_order,
    validation_subset,
)
from calotune.detectors import get_detector
from calotune.showers import ShowerSet
from calotune.tuning.worker import FAILED_KEY, TrialContext, train

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


def _sample(n: int, width: int = 7, seed: int = 0) -> ShowerSet:
    rng = np.random.default_rng(seed)
    return ShowerSet(conditions={"energy": rng.uniform(1, 2, n).astype(np.float32)},
                     cells={"a": rng.random((n, width), dtype=np.float32),
                            "b": rng.random((n, 3), dtype=np.float32)})


@pytest.mark.parametrize("copy_below", [0, 1 << 40])  # the in-place cycle walk, and the small-array copy
def test_in_place_split_equals_the_copying_split(monkeypatch: pytest.MonkeyPatch, copy_below: int) -> None:
    monkeypatch.setattr(splits_mod, "COPY_BELOW_BYTES", copy_below)
    reference = split(_sample(997), 0.2, 0.1, seed=5)
    sample = _sample(997)
    base = sample.cells["a"]
    fast = split(sample, 0.2, 0.1, seed=5, in_place=True)
    for name in ("train", "validation", "test"):
        want, got = getattr(reference, name), getattr(fast, name)
        for key in ("a", "b"):
            np.testing.assert_array_equal(got.cells[key], want.cells[key])
        np.testing.assert_array_equal(got.conditions["energy"], want.conditions["energy"])
        # no second copy of the cells: every split is a view of the array that was read
        assert np.shares_memory(got.cells["a"], base) == (copy_below == 0)


def test_permute_rows_is_fancy_indexing_without_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splits_mod, "COPY_BELOW_BYTES", 0)
    rng = np.random.default_rng(3)
    array = rng.random((500, 2, 3))
    want = array.copy()
    source = rng.permutation(500)
    out = permute_rows(array, source)
    assert out is array
    np.testing.assert_array_equal(out, want[source])


def test_split_order_is_the_published_rule() -> None:
    """The split must stay the one promotion and lineage checks recompute from the seed."""
    order = np.random.default_rng(11).permutation(100)
    train, val, test = split_order(100, 0.15, 0.15, seed=11)
    np.testing.assert_array_equal(val, np.sort(order[:15]))
    np.testing.assert_array_equal(test, np.sort(order[15:30]))
    np.testing.assert_array_equal(train, np.sort(order[30:]))


def test_what_the_driver_keeps_shares_nothing_with_the_read_arrays() -> None:
    sample = _sample(200)
    parts = split(sample, seed=1, in_place=True)
    kept_test, empty = detach(parts.test), empty_like(parts.train)
    for part in (kept_test, empty):
        for key, array in part.cells.items():
            assert not np.shares_memory(array, sample.cells[key])
    assert len(empty) == 0 and empty.cells["a"].shape == (0, 7)
    np.testing.assert_array_equal(kept_test.cells["a"], parts.test.cells["a"])


def test_validation_subset_is_fixed_random_and_capped() -> None:
    val = _sample(3000)
    a, b = validation_subset(val, 500, seed=4), validation_subset(val, 500, seed=4)
    assert len(a) == 500
    np.testing.assert_array_equal(a.cells["a"], b.cells["a"])  # same events every epoch and trial
    energy = val.conditions["energy"]
    positions = np.searchsorted(np.sort(energy), a.conditions["energy"])
    assert positions.max() > 2500 and positions.min() < 500  # spread over the split, not its head
    assert validation_subset(val, None, seed=4) is val and validation_subset(val, 5000, seed=4) is val


def _read_only(sample: ShowerSet) -> ShowerSet:
    """What a trial gets from Ray's object store: read-only arrays it must not copy."""
    for arrays in (sample.conditions, sample.cells):
        for array in arrays.values():
            array.flags.writeable = False
    return sample


def test_a_trial_allocates_far_less_than_its_training_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real trainer: batches are indexed out of the shared, read-only arrays,
    so an epoch's peak allocation (NumPy reports to tracemalloc) is a few batches, not a
    copy of the training split. Traced around the epoch only: tracing a whole trial
    (validation scoring, checkpoints) would take minutes."""
    from calotune.tuning import worker

    detector = get_detector("zdc", **GEOMETRY)
    base = detector.synthesize(600, seed=2)
    reps = 40  # 24 000 events, 7.5 MB of training cells
    big = ShowerSet(conditions={k: np.tile(v, reps) for k, v in base.conditions.items()},
                    cells={k: np.tile(v, (reps, 1)) for k, v in base.cells.items()})
    data = split(big, seed=0, in_place=True)
    data.train, data.validation = _read_only(data.train), _read_only(data.validation)
    train_bytes = sum(v.nbytes for v in data.train.cells.values())
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                       objectives=(("mean_separation", "min"),), max_epochs=1,
                       fixed={"hidden_width": 8, "batch_size": 1024}, validation_batch=200,
                       validation_events=200)
    peaks: list[int] = []
    original = worker._train_epoch

    def traced(*args: Any, **kwargs: Any) -> Any:
        tracemalloc.start()
        try:
            return original(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(worker, "_train_epoch", traced)
    results: list[dict[str, Any]] = []
    train(ctx, {}, data, lambda m, c: results.append(m), device=torch.device("cpu"))
    assert "mean_separation" in results[-1] and len(peaks) == 1
    # measured: two batches in flight, about 1 MB; a copy of the split would be 7.5 MB
    assert peaks[0] < train_bytes / 4, (peaks, train_bytes)


def test_a_nan_fails_the_trial_before_scoring_with_deferred_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the finiteness flag read only at the epoch's end (as on a GPU), a NaN loss
    still fails the trial and no score is reported."""
    from calotune.tuning import worker

    monkeypatch.setattr(worker, "CHECK_EVERY_CPU", 10**9)
    monkeypatch.setenv(worker.FAULT_ENV, '{"kind": "nan", "epoch": 1}')
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(300, seed=2), seed=0)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                       objectives=(("mean_separation", "min"),), max_epochs=2,
                       fixed={"hidden_width": 8, "batch_size": 32}, validation_batch=64)
    scored = []
    monkeypatch.setattr(worker, "_validate", lambda *a, **k: scored.append(1) or {})
    results: list[dict[str, Any]] = []
    train(ctx, {}, data, lambda m, c: results.append(m), device=torch.device("cpu"))
    assert results == [{FAILED_KEY: results[0][FAILED_KEY]}] and "non-finite" in results[0][FAILED_KEY]
    assert scored == []


@pytest.mark.slow
def test_trial_data_from_the_object_store_is_shared_not_copied() -> None:
    """ray.put in the driver, ray.get in a worker process (as trial_driver does): the
    training arrays are read-only views of the store, the same memory for every get."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        data = split(_sample(20_000, width=64), seed=0, in_place=True)
        ref = ray.put(data)

        @ray.remote(num_cpus=1)
        def probe(refs: list) -> tuple[bool, bool, int]:
            first, second = ray.get(refs[0]), ray.get(refs[0])
            cells = first.train.cells["a"]
            batch = first.train.batch_arrays(np.arange(0, 100))["cells"]["a"]
            return (np.shares_memory(cells, second.train.cells["a"]), cells.flags.writeable,
                    int(batch.flags.owndata))

        shared, writeable, batch_owns = ray.get(probe.remote([ref]))
    finally:
        ray.shutdown()
    assert shared and not writeable and batch_owns == 1


def test_point_clouds_split_and_detach_by_copying() -> None:
    """Ragged hits cannot be reordered in place: a point-cloud sample falls back to copies."""
    sample = get_detector("hgcal").synthesize(120, seed=1)
    parts = split(sample, seed=0, in_place=True)
    kept, empty = detach(parts.test), empty_like(parts.train)
    assert type(kept) is type(sample) and len(kept) == len(parts.test) and len(empty) == 0
    assert not np.shares_memory(kept.hits, sample.hits)
