"""calotune's samplers on a function with a known optimum (benchmarks/synthetic_hpo.py).

In-process plain Optuna, no Ray, no data: a few seconds. Every study is seeded, so each
assertion is deterministic for the installed Optuna; none depends on timing or load.
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from calotune.tuning.algorithms import SAMPLERS as CALOTUNE_SAMPLERS

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "synthetic_hpo.py"
_SPEC = importlib.util.spec_from_file_location("synthetic_hpo", _PATH)
hpo = importlib.util.module_from_spec(_SPEC)
sys.modules["synthetic_hpo"] = hpo  # dataclasses look their module up by name
_SPEC.loader.exec_module(hpo)


def test_known_optimum_is_reproduced_at_the_known_argmin() -> None:
    fn = hpo.MFHartmann6()
    assert fn(hpo.HARTMANN6_ARGMIN) == pytest.approx(hpo.HARTMANN6_MIN, abs=1e-4)
    # a local search around the argmin finds nothing lower: it is the minimum, not a point
    rng = np.random.default_rng(0)
    near = np.clip(np.array(hpo.HARTMANN6_ARGMIN) + rng.normal(0, 0.02, size=(200, 6)), 0, 1)
    assert min(fn(x) for x in near) > hpo.HARTMANN6_MIN - 1e-4


def test_low_fidelity_is_biased_and_noisy_but_deterministic() -> None:
    fn = hpo.MFHartmann6(n_fidelities=9, bias=1.0, noise=0.1)
    x = hpo.HARTMANN6_ARGMIN
    low = fn(x, 1)
    # alpha' = alpha - bias at the lowest fidelity: the minimum is much shallower there
    assert low > hpo.HARTMANN6_MIN + 0.5
    assert fn(x, 1) == low  # the same query gives the same answer
    # the bias shrinks as the fidelity rises: noise-free values fall strictly towards the minimum
    clean = [hpo.MFHartmann6(noise=0.0)(x, z) for z in range(1, 10)]
    assert all(a > b for a, b in itertools.pairwise(clean))
    # the noise is non-negative, present below the top fidelity and absent at it
    assert all(fn(x, z) >= c for z, c in zip(range(1, 10), clean, strict=True))
    assert fn(x, 5) > clean[4] and fn(x, 9) == clean[8]
    with pytest.raises(ValueError, match="fidelity must be in"):
        fn(x, 10)


def test_the_benchmark_covers_every_sampler_calotune_offers() -> None:
    assert set(hpo.SAMPLERS) == set(CALOTUNE_SAMPLERS)


@pytest.mark.parametrize("sampler", hpo.SAMPLERS)
def test_each_sampler_runs_and_reports_regret(sampler: str) -> None:
    result = hpo.run(sampler, seed=0, trials=12)
    assert len(result.regret_curve) == 12
    assert result.regret >= 0 and result.regret == result.regret_curve[-1]
    assert all(a >= b for a, b in itertools.pairwise(result.regret_curve))
    assert result.cost == 12 * hpo.MFHartmann6().n_fidelities
    assert hpo.run(sampler, seed=0, trials=12).regret == result.regret  # seeded: reproducible


def test_successive_halving_prunes_and_saves_fidelity_steps() -> None:
    result = hpo.run("random", seed=0, trials=12, pruner="asha")
    assert result.cost < 12 * hpo.MFHartmann6().n_fidelities


def test_tpe_beats_random_at_equal_budget() -> None:
    """TPE's median regret over five fixed seeds at 50 trials is below random's.

    Measured (Optuna 5.1): TPE 0.74 (0.30-0.95), random 1.72 (1.21-2.07): every TPE seed
    beats every random seed, so this holds with margin, not by luck of one seed.
    """
    seeds = range(5)
    tpe = [hpo.run("tpe", seed=s, trials=50).regret for s in seeds]
    random = [hpo.run("random", seed=s, trials=50).regret for s in seeds]
    assert statistics.median(tpe) < statistics.median(random) - 0.3, (tpe, random)


# --- the arithmetic of benchmarks/time_to_quality.py (its searches themselves are too slow for CI) ---
_TTQ_PATH = _PATH.with_name("time_to_quality.py")
_TTQ_SPEC = importlib.util.spec_from_file_location("time_to_quality", _TTQ_PATH)
ttq = importlib.util.module_from_spec(_TTQ_SPEC)
sys.modules["time_to_quality"] = ttq
_TTQ_SPEC.loader.exec_module(ttq)


def test_time_to_quality_curve_counts_every_report_in_store_order() -> None:
    # (timestamp ms, step, value, usable): out of order on purpose; the unusable report is a
    # failed trial's epoch: compute, but never quality
    reports = [(30, 1, 0.5, True), (10, 1, 0.7, True), (20, 1, 0.1, False), (40, 2, 0.4, True)]
    curve, total = ttq.best_so_far_curve(reports, "min")
    assert total == 4
    assert curve == [(1, 0.7), (2, 0.7), (3, 0.5), (4, 0.4)]
    up, _ = ttq.best_so_far_curve([(1, 1, 0.2, True), (2, 1, 0.9, True), (3, 2, 0.5, True)], "max")
    assert up == [(1, 0.2), (2, 0.9), (3, 0.9)]
    assert ttq.value_at(curve, 0) != ttq.value_at(curve, 0)  # NaN before the first report
    assert ttq.value_at(curve, 3) == 0.5 and ttq.value_at(curve, 99) == 0.4  # held after the end


def _result(curve: list[tuple[int, float]], total: int, test: float) -> object:
    return ttq.SearchResult(search="s", total_epochs=total, curve=curve, final_validation=curve[-1][1],
                            final_test=test, default_test=None, n_trials=1)


def test_time_to_quality_compute_to_the_reference_final() -> None:
    results = {
        "random": {0: _result([(1, 0.9), (6, 0.5), (12, 0.4)], 12, 0.45),
                   1: _result([(1, 0.8), (10, 0.4), (12, 0.4)], 12, 0.41)},
        "fast": {0: _result([(1, 0.6), (3, 0.38)], 8, 0.40),
                 1: _result([(2, 0.41), (4, 0.39)], 8, 0.39)},
        "never": {0: _result([(1, 0.7)], 12, 0.7), 1: _result([(1, 0.6)], 12, 0.6)},
    }
    out = ttq.aggregate(results, "min")
    assert out["reference"]["final_validation_median"] == 0.4
    assert out["reference"]["total_trial_epochs_median"] == 12
    fast = out["arms"]["fast"]["to_reference_final"]
    # median curve of "fast": x=3 -> median(0.38, 0.41) = 0.395 <= 0.4 first
    assert fast["trial_epochs_median_curve"] == 3
    assert fast["fraction_of_reference_total"] == 3 / 12 and fast["meets_target"] is True
    assert fast["per_seed_fraction"]["values"] == [3 / 12, 4 / 12] and fast["per_seed_reached"] == "2/2"
    never = out["arms"]["never"]["to_reference_final"]
    assert never["fraction_of_reference_total"] is None and never["per_seed_reached"] == "0/2"
    assert out["arms"]["fast"]["final_test"]["median"] == 0.395


def test_time_to_quality_interleaves_seeds_and_rotates_arms() -> None:
    order = ttq.interleaved(["a", "b", "c"], [0, 1, 2])
    assert order[:3] == [("a", 0), ("b", 0), ("c", 0)]
    assert order[3:6] == [("b", 1), ("c", 1), ("a", 1)]
    assert [s for _, s in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ttq.parse_seeds("0-2,7") == [0, 1, 2, 7]
