"""The bookkeeping of benchmarks/time_to_quality.py: curves, equal-compute cuts, warm vs cold.

In-process, no Ray, no MLflow: the functions that turn epoch reports into the figures of
benchmarks/README.md. The searches themselves are the benchmark's job, not the suite's.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> object:
    """A benchmark script as a module (registered by name: dataclasses look it up there)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("synthetic_hpo")  # time_to_quality imports its --seeds parser
ttq = _load("time_to_quality")


def result(curve: list[tuple[int, float]], total: int, test: float | None = None,
           histories: list[dict[int, float]] | None = None) -> object:
    return ttq.SearchResult(search="s", total_epochs=total, curve=curve, final_validation=curve[-1][1],
                            final_test=test, default_test=None, n_trials=1, histories=histories or [])


def test_curve_counts_failed_compute_but_not_its_values() -> None:
    reports = [(1, 1, 0.9, True), (2, 1, 0.1, False), (3, 2, 0.8, True), (4, 3, 0.85, True)]
    points, total = ttq.best_so_far_curve(reports, "min")
    assert total == 4
    assert points == [(1, 0.9), (2, 0.9), (3, 0.8), (4, 0.8)]
    assert ttq.value_at(points, 0) != ttq.value_at(points, 0)  # NaN before the first report
    assert ttq.value_at(points, 10) == 0.8
    assert ttq.first_reaching(points, 0.8, "min") == 3
    assert ttq.first_reaching(points, 0.5, "min") is None


def test_spearman_ranks_ties_and_sign() -> None:
    assert ttq.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ttq.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ttq.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)
    assert ttq.spearman([1, 2], [1, 2]) is None


def test_rung_correlation_uses_trials_that_reached_the_final_epoch() -> None:
    histories = [{1: 0.1, 9: 0.3}, {1: 0.2, 9: 0.2}, {1: 0.3, 9: 0.1}, {1: 0.05}]  # last: stopped
    rc = ttq.rung_correlations({0: result([(1, 0.1)], 30, histories=histories)}, 9, [1])
    assert rc["epoch_1"]["pooled"] == pytest.approx(-1.0)
    assert rc["epoch_1"]["pooled_trials"] == 3


def test_arm_trials_gives_stopping_arms_their_own_budget() -> None:
    args = argparse.Namespace(trials=8, stop_trials=24, warm_source_trials=72)
    assert ttq.arm_trials(args, "random") == 8
    assert {ttq.arm_trials(args, a) for a in ("tpe+asha", "wandb", "warm")} == {24}
    assert ttq.arm_trials(args, "warm-source") == 72


def test_warm_vs_cold_compares_at_the_smaller_total() -> None:
    warm = {0: result([(1, 0.5), (60, 0.4)], 60, test=0.42), 1: result([(1, 0.6)], 70, test=0.7)}
    cold = {0: result([(1, 0.9), (50, 0.45), (80, 0.3)], 80, test=0.35), 1: result([(1, 0.5)], 70, test=0.5)}
    wc = ttq.warm_vs_cold(warm, cold, "min")
    seed0 = wc["per_seed"]["0"]
    assert seed0["equal_trial_epochs"] == 60
    assert seed0["cold_validation"] == 0.45  # cold's 0.3 came after 60 trial-epochs
    assert seed0["validation_gain"] == pytest.approx(0.05)
    assert seed0["test_gain"] == pytest.approx(-0.07)
    assert wc["warm_wins_validation"] == "1/2"
    assert wc["warm_wins_test"] == "0/2"


def test_aggregate_reports_validation_at_the_reference_compute() -> None:
    results = {"random": {0: result([(1, 0.8), (72, 0.5)], 72)},
               "tpe+asha": {0: result([(1, 0.9), (30, 0.5), (90, 0.2)], 90)}}
    out = ttq.aggregate(results, "min")
    assert out["arms"]["tpe+asha"]["validation_at_reference_total"] == {"0": 0.5}
    reach = out["arms"]["tpe+asha"]["to_reference_final"]
    assert reach["per_seed_fraction"]["values"] == [pytest.approx(30 / 72)]


def test_a_ledger_row_matches_its_budget_by_the_space_file_name_not_its_path() -> None:
    """A run from a snapshot of the tree is reported from the working tree (--report-only
    with the default --space); any other difference in the budget is another run."""
    key = {"space": "/work/main/benchmarks/spaces/zdc_swiglu_ttq.yaml", "trials": 8, "max_epochs": 9}
    snapshot = {**key, "space": "/tmp/ttq-src/benchmarks/spaces/zdc_swiglu_ttq.yaml"}
    assert ttq.same_budget(snapshot, key)
    assert not ttq.same_budget({**snapshot, "trials": 10}, key)
    assert not ttq.same_budget({**snapshot, "space": "/tmp/other.yaml"}, key)
    assert not ttq.same_budget(None, key)
