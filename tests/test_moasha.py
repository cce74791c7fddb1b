"""MO-ASHA's decisions, in-process with fake trials: a dominated trial stops at its rung, a
non-dominated one continues, the baseline always continues, the top 1/eta is kept, and why a
trial was stopped reaches its result (the MLflow reason and the summary read it there)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from calotune.spec import parse_spec
from calotune.tuning import algorithms
from calotune.tuning.moasha import MOASHA, keeps, mo_order, nondominated_fronts
from calotune.tuning.runner import STOPPED_KEY, StopReasonCallback, result_state

CONTINUE, STOP = "CONTINUE", "STOP"
BASELINE = {"lr": 1.0}
METRICS = ("mean_separation", "gen_time_ms")


def _trial(name: str, lr: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=name, config={"lr": lr})


def _result(epoch: int, separation: float, gen_time: float) -> dict:
    return {"training_iteration": epoch, "mean_separation": separation, "gen_time_ms": gen_time}


def _scheduler(max_t: int = 4, eta: int = 2, modes: tuple[str, str] = ("min", "min")) -> MOASHA:
    return MOASHA(BASELINE, metrics=METRICS, modes=modes, max_t=max_t, grace_period=1, reduction_factor=eta)


def test_fronts_and_the_epsilon_net_order() -> None:
    points = [(0.5, 5.0), (0.4, 4.0), (0.6, 6.0), (0.1, 9.0)]
    assert nondominated_fronts(points) == [[1, 3], [0], [2]]
    # the seed is the best on the first objective; fronts come in order
    assert mo_order(points) == [3, 1, 0, 2]
    # on one front the near-duplicate of a point already taken comes last: spread wins
    line = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (0.49, 0.51)]
    assert mo_order(line) == [0, 2, 1, 3]
    # objectives of very different units are compared on [0, 1] scales
    scaled = [(0.0, 100.0), (0.5, 50.0), (1.0, 0.0), (0.49, 51.0)]
    assert mo_order(scaled) == [0, 2, 1, 3]


@pytest.mark.parametrize("eta, n, kept", [(2, 1, 1), (2, 2, 1), (2, 3, 2), (2, 4, 2), (3, 3, 1), (3, 4, 2)])
def test_the_top_one_over_eta_continue(eta: int, n: int, kept: int) -> None:
    assert [keeps(r, n, eta) for r in range(n)] == [True] * kept + [False] * (n - kept)


def test_dominated_stops_at_the_rung_and_non_dominated_continues() -> None:
    moasha = _scheduler()
    assert moasha.rungs == [1, 2]
    base, good, bad, extreme = _trial("base", 1.0), _trial("good", 2.0), _trial("bad", 3.0), _trial("x", 4.0)
    assert moasha.on_trial_result(None, base, _result(1, 0.5, 5.0)) == CONTINUE  # the first at a rung
    assert moasha.on_trial_result(None, good, _result(1, 0.4, 4.0)) == CONTINUE  # dominates base
    assert moasha.on_trial_result(None, bad, _result(1, 0.6, 6.0)) == STOP  # dominated by both
    why = moasha.stopped["bad"]
    assert (why["rung"], why["epoch"], why["dominated_by"], why["rank"], why["at_rung"]) == (0, 1, 2, 3, 3)
    assert why["text"].startswith("MO-ASHA: dominated at rung 0 (epoch 1) by 2 of the 2 trials there")
    # worse on separation than everyone but the fastest: on the front, ranked first by the net
    assert moasha.on_trial_result(None, extreme, _result(1, 0.1, 9.0)) == CONTINUE
    assert set(moasha.recorded[0]) == {"base", "good", "bad", "x"}
    # between rungs nobody is judged; at the next rung the comparison starts again
    assert moasha.on_trial_result(None, good, _result(2, 0.3, 4.0)) == CONTINUE
    assert moasha.on_trial_result(None, extreme, _result(2, 0.35, 9.5)) == STOP
    assert moasha.stopped["x"]["rung"] == 1 and moasha.stopped["x"]["dominated_by"] == 1
    assert moasha.on_trial_result(None, good, _result(3, 0.2, 4.0)) == CONTINUE  # no rung at 3
    assert moasha.on_trial_result(None, good, _result(4, 0.2, 4.0)) == STOP  # finished
    assert "good" not in moasha.stopped


def test_a_crowded_point_of_the_front_is_cut_with_its_reason() -> None:
    moasha = _scheduler()
    for i, point in enumerate([(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)]):
        assert moasha.on_trial_result(None, _trial(f"t{i}", 2.0 + i), _result(1, *point)) in (CONTINUE, STOP)
    assert moasha.on_trial_result(None, _trial("near", 9.0), _result(1, 0.49, 0.51)) == STOP
    assert moasha.stopped["near"]["dominated_by"] == 0
    assert "on the Pareto front at rung 0 (epoch 1) but crowded out" in moasha.stopped["near"]["text"]


def test_the_baseline_always_continues_but_is_ranked() -> None:
    moasha = _scheduler()
    assert moasha.on_trial_result(None, _trial("good", 2.0), _result(1, 0.1, 1.0)) == CONTINUE
    base = _trial("base", 1.0)
    assert moasha.on_trial_result(None, base, _result(1, 0.9, 9.0)) == CONTINUE  # dominated, kept
    assert "base" in moasha.recorded[0] and "base" not in moasha.stopped
    # it counts for the ones after it: a third trial between the two is in the top 2 of 3
    assert moasha.on_trial_result(None, _trial("mid", 3.0), _result(1, 0.5, 5.0)) == CONTINUE
    assert moasha.on_trial_result(None, base, _result(4, 0.9, 9.0)) == CONTINUE  # at max_t too


def test_modes_are_respected_and_an_unscoreable_epoch_is_not_ranked() -> None:
    moasha = _scheduler(modes=("max", "min"))
    assert moasha.on_trial_result(None, _trial("a", 2.0), _result(1, 0.9, 1.0)) == CONTINUE
    # lower separation is worse when it is maximised: dominated
    assert moasha.on_trial_result(None, _trial("b", 3.0), _result(1, 0.1, 2.0)) == STOP
    missing = {"training_iteration": 1, "mean_separation": 0.5}  # no gen_time_ms: not scoreable
    assert moasha.on_trial_result(None, _trial("c", 4.0), missing) == CONTINUE
    assert "c" not in moasha.recorded[0]


def test_eta_three_keeps_a_third() -> None:
    moasha = _scheduler(max_t=9, eta=3)
    assert moasha.rungs == [1, 3]
    decisions = [moasha.on_trial_result(None, _trial(f"t{i}", 2.0 + i), _result(1, 1.0 - 0.1 * i, 1.0 - 0.1 * i))
                 for i in range(3)]
    assert decisions == [CONTINUE, CONTINUE, CONTINUE]  # each one better than all before it
    worst = moasha.on_trial_result(None, _trial("w", 9.0), _result(1, 2.0, 2.0))  # rank 4 of 4: top 2 go on
    second = moasha.on_trial_result(None, _trial("s", 8.0), _result(1, 0.85, 0.85))  # rank 2 of 5: top 2
    fourth = moasha.on_trial_result(None, _trial("f", 7.0), _result(1, 0.95, 0.95))  # rank 4 of 6: top 2
    assert (worst, second, fourth) == (STOP, CONTINUE, STOP)


def test_the_reason_reaches_the_result_and_the_state() -> None:
    moasha = _scheduler()
    moasha.on_trial_result(None, _trial("a", 2.0), _result(1, 0.1, 1.0))
    loser = _trial("b", 3.0)
    result = _result(1, 0.9, 9.0)
    assert moasha.on_trial_result(None, loser, dict(result)) == STOP
    StopReasonCallback(moasha).on_trial_result(0, [], loser, result)
    assert result["stopped_at_rung"] == 0 and result["stopped_at_epoch"] == 1
    assert result["stopped_dominated_by"] == 1
    state, reason = result_state(result, max_epochs=4)
    assert state == "pruned" and reason == moasha.stopped["b"]["text"]
    untouched = _result(1, 0.1, 1.0)
    StopReasonCallback(moasha).on_trial_result(0, [], _trial("a", 2.0), untouched)
    assert STOPPED_KEY not in untouched


def test_asha_records_its_rung_too() -> None:
    from calotune.tuning.runner import BaselineKeepingASHA

    asha = BaselineKeepingASHA(BASELINE, time_attr="training_iteration", metric="mean_separation", mode="min",
                               max_t=4, grace_period=1, reduction_factor=2)
    good, bad = _trial("good", 2.0), _trial("bad", 3.0)
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"training_iteration": 1, "mean_separation": 0.1}) == CONTINUE
    assert asha.on_trial_result(None, bad, {"training_iteration": 1, "mean_separation": 0.5}) == STOP
    why = asha.stopped["bad"]
    assert (why["rung"], why["epoch"]) == (0, 1) and "cutoff 0.1 over the 1 trial(s)" in why["text"]


def test_pickles_with_its_rungs() -> None:
    """Tune pickles the scheduler with the Tuner (tuner.pkl), for resume."""
    moasha = _scheduler()
    moasha.on_trial_result(None, _trial("a", 2.0), _result(1, 0.1, 1.0))
    clone = pickle.loads(pickle.dumps(moasha))
    assert clone.recorded == moasha.recorded
    assert clone.on_trial_result(None, _trial("b", 3.0), _result(1, 0.9, 9.0)) == STOP


def test_moasha_is_the_default_for_several_objectives_and_asha_points_to_it() -> None:
    base = {"name": "a", "family": "zdc_swiglu", "detector": "zdc",
            "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 1e-3}},
            "objectives": [{"metric": m, "mode": "min"} for m in METRICS]}
    assert parse_spec(base, "a.yaml").scheduler.type == "moasha"
    with pytest.raises(Exception, match="use moasha"):
        parse_spec({**base, "scheduler": {"type": "asha"}}, "a.yaml")
    made = algorithms.make_scheduler("moasha", metric=list(METRICS), mode=["min", "max"], max_t=4, grace_period=1,
                                     reduction_factor=2, baseline=BASELINE)
    assert isinstance(made, MOASHA) and made.metric == "mean_separation" and made.rungs == [1, 2]
