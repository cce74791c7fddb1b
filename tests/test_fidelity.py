"""Data size as a fidelity: the schedule is checked with the rule in the message, each epoch
trains on the events its rung allows (a nested, seeded subset), the count is reported per
epoch and in total, and a resumed trial trains on exactly what an uninterrupted one did."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.spec import parse_spec
from calotune.tuning import worker
from calotune.tuning.algorithms import epoch_fractions, rung_epochs
from calotune.tuning.worker import TRAIN_STATE, TrialContext, epoch_events, epoch_shard, train

BASE = {"name": "a", "family": "zdc_swiglu", "detector": "zdc", "budget": {"max_epochs": 8},
        "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 1e-3}}}
GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


@pytest.mark.parametrize("scheduler, words", [
    ({"type": "asha", "data_fractions": [0.5]}, "the last fraction must be 1"),
    ({"type": "asha", "data_fractions": [0.5, 0.25, 1.0]}, "must increase strictly"),
    ({"type": "asha", "data_fractions": [0.0, 1.0]}, "a number in (0, 1], but got 0.0"),
    ({"type": "asha", "data_fractions": [0.5, 1.5]}, "a number in (0, 1], but got 1.5"),
    ({"type": "asha", "data_fractions": [True, 1.0]}, "a number in (0, 1], but got True"),
    ({"type": "asha", "data_fractions": []}, "non-empty list"),
    ({"type": "asha", "data_fractions": 0.5}, "must be a list"),
    ({"type": "median", "data_fractions": [0.5, 1.0]}, "change at the rungs of asha or moasha"),
    ({"type": "asha", "grace_period": 2, "data_fractions": [0.25, 0.5, 0.75, 1.0]},
     "4 fractions need 3 rungs to graduate at, but with grace_period 2, reduction_factor 2 and max_epochs 8 "
     "the rungs are at epoch(s) [2, 4] (2); give at most 3 fractions"),
])
def test_bad_schedules_are_refused_with_the_rule(scheduler: dict, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_spec({**BASE, "scheduler": scheduler}, "a.yaml")
    assert str(info.value).startswith("a.yaml: scheduler.data_fractions:") and words in str(info.value), info.value


def test_each_rung_graduates_to_the_next_fraction() -> None:
    spec = parse_spec({**BASE, "scheduler": {"type": "asha", "grace_period": 1, "data_fractions": [0.25, 0.5, 1]}},
                      "a.yaml")
    assert spec.scheduler.data_fractions == (0.25, 0.5, 1.0)
    assert rung_epochs(1, 2, 8) == [1, 2, 4] and rung_epochs(2, 2, 8) == [2, 4] and rung_epochs(3, 2, 2) == []
    assert epoch_fractions((0.25, 0.5, 1.0), 1, 2, 8) == (0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert epoch_fractions((0.25, 0.5, 1.0), 2, 2, 8) == (0.25, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0)
    assert epoch_fractions(None, 1, 2, 8) is None
    # without fractions the space keeps the representation (and so the hash) it always had
    assert "data_fractions" not in repr(parse_spec({**BASE, "scheduler": {"type": "asha"}}, "a.yaml").scheduler)


def test_the_subset_is_seeded_nested_and_split_evenly_over_ranks() -> None:
    assert epoch_events(0, None, 140) == 140 and epoch_events(0, (0.25, 1.0), 140) == 35
    assert epoch_events(0, (0.25, 1.0), 140, world_size=2) == 34  # equal shards on both ranks
    assert epoch_events(1, (0.25, 1.0), 140, world_size=2) == 140
    quarter, half = epoch_shard(35, 140, 7, 0, 1), epoch_shard(70, 140, 7, 0, 1)
    assert len(set(quarter)) == 35 and set(quarter) <= set(half)
    assert not np.array_equal(quarter, np.arange(35))  # a random subset, not the split's first rows
    assert np.array_equal(quarter, epoch_shard(35, 140, 7, 0, 1))  # same seed, same events
    ranks = [epoch_shard(34, 140, 7, r, 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 17
    assert set(ranks[0]) | set(ranks[1]) == set(epoch_shard(34, 140, 7, 0, 1))
    assert np.array_equal(epoch_shard(140, 140, 7, 1, 2), np.arange(140)[1::2])  # all: as before


def _run(tmp_path: Path, max_epochs: int, resume: Path | None = None) -> tuple[list[dict[str, Any]],
                                                                               list[np.ndarray], list[Path]]:
    """Train the tiny ZDC model on fractions (0.25, 0.5, 1) for ``max_epochs``: the reported
    metrics, the index order each epoch trained on, a copy of each epoch's checkpoint."""
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(200, seed=2), seed=0)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                       objectives=(("mean_separation", "min"),), max_epochs=max_epochs, seed=3,
                       fixed={"hidden_width": 16, "batch_size": 35}, validation_batch=16,
                       data_fractions=epoch_fractions((0.25, 0.5, 1.0), 1, 2, max_epochs))
    results, orders, checkpoints = [], [], []
    real = worker._train_epoch

    def spy(model, optimizers, ctx, train_set, order, *args, **kwargs):
        orders.append(np.array(order))
        return real(model, optimizers, ctx, train_set, order, *args, **kwargs)

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        results.append(dict(metrics))
        assert checkpoint is not None
        keep = tmp_path / f"ckpt{len(checkpoints)}{'r' if resume else ''}"
        shutil.copytree(checkpoint, keep)
        checkpoints.append(keep)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, "_train_epoch", spy)
        train(ctx, {}, data, report, device=torch.device("cpu"), resume_dir=resume)
    assert len(data.train) == 140
    return results, orders, checkpoints


def test_epochs_train_on_the_schedule_and_resume_reproduces_it(tmp_path: Path) -> None:
    results, orders, checkpoints = _run(tmp_path, 3)
    assert [r["train_data_fraction"] for r in results] == [0.25, 0.5, 1.0]
    assert [r["train_events"] for r in results] == [35, 70, 140]  # batch_size 35 divides each
    assert [r["train_events_total"] for r in results] == [35, 105, 245]
    assert [len(o) for o in orders] == [35, 70, 140] and set(orders[0]) <= set(orders[1])
    assert set(orders[2]) == set(range(140))
    # a trial resumed from its epoch-1 checkpoint trains epochs 2 and 3 on the same events in
    # the same order, and counts on from where it stopped
    assert (checkpoints[0] / TRAIN_STATE).is_file()
    resumed, resumed_orders, _ = _run(tmp_path, 3, resume=checkpoints[0])
    assert [r["train_events_total"] for r in resumed] == [105, 245]
    assert all(np.array_equal(a, b) for a, b in zip(resumed_orders, orders[1:], strict=True))
    assert resumed[-1]["mean_separation"] == pytest.approx(results[-1]["mean_separation"])


@pytest.mark.parametrize("flags, words", [
    ({"max_epochs": 1}, "(with --max-epochs): 2 fractions need 1 rungs to graduate at"),
    ({"scheduler": "median"}, "(with --scheduler): data fractions change at the rungs of asha or moasha"),
])
def test_flags_that_break_the_schedule_are_refused(flags: dict, words: str) -> None:
    """--max-epochs and --scheduler are applied after the space was checked: checked again."""
    import dataclasses

    from calotune.tuning.orchestrate import SearchRequest, _check_data_fractions

    spec = parse_spec({**BASE, "scheduler": {"type": "asha", "grace_period": 1, "data_fractions": [0.5, 1.0]}},
                      "a.yaml")
    changed = dataclasses.replace(spec, max_epochs=flags.get("max_epochs", spec.max_epochs),
                                  scheduler=dataclasses.replace(spec.scheduler,
                                                                type=flags.get("scheduler", "asha")))
    _check_data_fractions(spec, SearchRequest(space="a.yaml"))  # as written: fine
    with pytest.raises(UserError) as info:
        _check_data_fractions(changed, SearchRequest(space="a.yaml", **flags))
    assert str(info.value).startswith("a.yaml: scheduler.data_fractions (with") and words in str(info.value)


@pytest.mark.parametrize("n_train", [7, 255, 256])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_full_epoch_shards_are_equal_on_every_rank_and_cover_the_split(n_train: int, world_size: int) -> None:
    """Unequal shards give ranks different batch counts, and the rank with more batches
    then waits forever in the gradient all-reduce: every rank gets the same count, and
    together they still cover every training event."""
    shards = [epoch_shard(n_train, n_train, 0, rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set(np.concatenate(shards).tolist()) == set(range(n_train))
