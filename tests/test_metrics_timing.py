"""Generation time per shower at a stated batch size."""

from __future__ import annotations

import time

import pytest

from calotune.metrics.timing import generation_time


def test_per_shower_time_and_bookkeeping() -> None:
    calls: list[int] = []
    synced: list[int] = []

    def generate(batch: int) -> None:
        calls.append(batch)
        time.sleep(0.01)

    res = generation_time(generate, batch_size=50, n_batches=3, warmup=2,
                          synchronize=lambda: synced.append(1), device="cpu-test")
    assert calls == [50] * 5  # warm-up calls run but are not timed
    assert len(synced) == 5
    assert res.n_showers == 150 and res.batch_size == 50 and res.warmup_batches == 2
    assert res.per_shower_s == pytest.approx(res.total_s / 150)
    assert res.per_shower_s >= 0.01 / 50  # each batch slept 10 ms; no upper bound: load only adds
    assert res.median_batch_s >= 0.01
    d = res.as_dict()
    assert d["per_shower_ms"] == pytest.approx(1e3 * res.per_shower_s)
    assert d["device"] == "cpu-test"


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        generation_time(lambda n: None, batch_size=0)
