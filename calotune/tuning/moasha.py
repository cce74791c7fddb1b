"""MO-ASHA: asynchronous successive halving for several objectives.

Schmucker et al., "Multi-objective Asynchronous Successive Halving", arXiv 2106.12639.
ASHA (Li et al. arXiv 1810.05934) lets a trial that reaches a rung continue only if it is
among the top ``1/eta`` of the trials recorded at that rung; with several objectives "top"
is a ranking by non-dominated sorting (Deb et al. 2002): first the Pareto front of the
rung, then the front of what remains, and so on. Inside the front that the cut falls
into, the tie is broken by the paper's EpsNet selection: an epsilon-net order (Clarkson's
greedy farthest-point sparsification), which keeps the points that spread along the front
rather than a cluster of near-identical trade-offs.

Here the epsilon-net is computed in objective space scaled to [0, 1] per objective over
the rung's points: objectives such as a separation power (~0.1) and a generation time in
milliseconds (~1-100) would otherwise rank by the larger unit alone. Its seed, when nothing
is selected yet, is the best point on the first objective, so the order (and so every
decision) is deterministic. Distances are taken to every point already ranked, earlier
fronts included, so the kept points spread over the whole selection.

Like calotune's single-objective ASHA, the decision is asynchronous and final: a trial is
judged once per rung against the trials that reached it before, and the baseline (the
default configuration) is never stopped, because the search compares its best trials
against it on held-out data. Why a trial was stopped is kept in :attr:`MOASHA.stopped`, for
:class:`calotune.tuning.runner.StopReasonCallback` to write into the trial's result.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from calotune.tuning.algorithms import rung_epochs
from calotune.tuning.pareto import pareto_front

log = logging.getLogger(__name__)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (every objective minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def nondominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` (minimised) by front: the Pareto front first, then the front of the rest."""
    remaining = list(range(len(points)))
    fronts = []
    while remaining:
        front = [remaining[i] for i in pareto_front([points[j] for j in remaining], ["min"] * len(points[0]))]
        fronts.append(front)
        taken = set(front)
        remaining = [i for i in remaining if i not in taken]
    return fronts


def _scaled(points: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each objective mapped to [0, 1] over ``points`` (a constant objective to 0)."""
    dims = range(len(points[0]))
    lows = [min(p[d] for p in points) for d in dims]
    spans = [max(p[d] for p in points) - lows[d] for d in dims]
    return [[(p[d] - lows[d]) / spans[d] if spans[d] > 0 else 0.0 for d in dims] for p in points]


def mo_order(points: Sequence[Sequence[float]]) -> list[int]:
    """All indices of ``points`` (minimised), best first: non-dominated sorting, and inside
    each front the epsilon-net order (greedy farthest point from what is already ranked)."""
    if not points:
        return []
    scaled = _scaled(points)
    order: list[int] = []
    for front in nondominated_fronts(points):
        left = list(front)
        if not order:  # the seed: best on the first objective, then on the others
            seed = min(left, key=lambda i: (tuple(points[i]), i))
            order.append(seed)
            left.remove(seed)
        nearest = {i: min(math.dist(scaled[i], scaled[j]) for j in order) for i in left}
        while left:
            pick = max(left, key=lambda i: (nearest[i], -i))  # ties: the earlier-recorded point
            order.append(pick)
            left.remove(pick)
            for i in left:
                nearest[i] = min(nearest[i], math.dist(scaled[i], scaled[pick]))
    return order


def keeps(rank: int, n: int, reduction_factor: float) -> bool:
    """Whether 0-based ``rank`` among ``n`` trials at a rung is in the top 1/eta (so the
    first trial at a rung always continues, and of two with eta 2 only the better one)."""
    return rank < n / reduction_factor


class MOASHA(FIFOScheduler):
    """MO-ASHA over ``time_attr`` (epochs): see the module docstring.

    ``metrics``/``modes``: the objectives. A result without all of them (an epoch of an
    unscoreable phase) is never recorded at a rung, and the trial continues.
    """

    def __init__(self, baseline: dict[str, Any], *, metrics: Sequence[str], modes: Sequence[str], max_t: int,
                 grace_period: int = 1, reduction_factor: int = 2, time_attr: str = "training_iteration") -> None:
        if len(metrics) != len(modes) or not metrics:
            raise ValueError(f"one mode per metric, got metrics={metrics} modes={modes}")
        if any(m not in ("min", "max") for m in modes):
            raise ValueError(f"modes must be min or max, got {modes}")
        if max_t < 1 or grace_period < 1 or reduction_factor < 2:
            raise ValueError(f"need max_t >= 1, grace_period >= 1, reduction_factor >= 2; got "
                             f"{max_t}, {grace_period}, {reduction_factor}")
        super().__init__()
        self._baseline = dict(baseline)
        self._metrics = tuple(metrics)
        self._signs = tuple(1.0 if m == "min" else -1.0 for m in modes)
        # Tune's strict result check (off in calotune's searches) and its logs read one name
        self._metric, self._mode = self._metrics[0], modes[0]
        self._max_t = max_t
        self._rf = reduction_factor
        self._time_attr = time_attr
        self.rungs = rung_epochs(grace_period, reduction_factor, max_t)
        #: per rung: trial id -> objective vector (minimised), in the order trials arrived
        self.recorded: list[dict[str, tuple[float, ...]]] = [{} for _ in self.rungs]
        #: trial id -> why it was stopped (rung, epoch, how many dominate it, the text)
        self.stopped: dict[str, dict[str, Any]] = {}

    # ---- Tune's scheduler interface ----------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Objectives come from the space, never from Tune (only None is accepted)."""
        return metric is None and mode is None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        vector = self._vector(result)
        if vector is None:
            return TrialScheduler.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t:  # finished, not judged (the trainable ends there anyway)
            return TrialScheduler.CONTINUE if self._is_baseline(trial) else TrialScheduler.STOP
        rung = self._rung_for(trial.trial_id, t)
        if rung is None:
            return TrialScheduler.CONTINUE
        others = self.recorded[rung]
        points = [*others.values(), vector]
        rank = mo_order(points).index(len(points) - 1)
        others[trial.trial_id] = vector
        if keeps(rank, len(points), self._rf) or self._is_baseline(trial):
            return TrialScheduler.CONTINUE
        self.stopped[trial.trial_id] = self._reason(rung, vector, list(points[:-1]), rank)
        log.debug("MO-ASHA stops %s: %s", trial.trial_id, self.stopped[trial.trial_id]["text"])
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """A trial that ends at a rung it was not judged at is recorded there (as ASHA does)."""
        vector = self._vector(result or {})
        if vector is None or result[self._time_attr] >= self._max_t:
            return
        rung = self._rung_for(trial.trial_id, result[self._time_attr])
        if rung is not None:
            self.recorded[rung][trial.trial_id] = vector

    def debug_string(self) -> str:
        return "MO-ASHA: " + ", ".join(f"rung {k} (epoch {e}): {len(r)} trials"
                                       for k, (e, r) in enumerate(zip(self.rungs, self.recorded, strict=True)))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # ---- internals -----------------------------------------------------------------
    def _vector(self, result: dict) -> tuple[float, ...] | None:
        if self._time_attr not in result or any(m not in result for m in self._metrics):
            return None
        return tuple(s * float(result[m]) for s, m in zip(self._signs, self._metrics, strict=True))

    def _rung_for(self, trial_id: str, t: float) -> int | None:
        """The highest rung at or below epoch ``t`` the trial was not judged at yet."""
        for k in reversed(range(len(self.rungs))):
            if self.rungs[k] <= t and trial_id not in self.recorded[k]:
                return k
            if self.rungs[k] <= t:
                return None  # judged at the highest rung it reached already
        return None

    def _is_baseline(self, trial: Any) -> bool:
        return dict(trial.config) == self._baseline

    def _reason(self, rung: int, vector: tuple[float, ...], others: list[tuple[float, ...]],
                rank: int) -> dict[str, Any]:
        n = len(others) + 1
        by = sum(dominates(o, vector) for o in others)
        keep = math.ceil(n / self._rf)
        where = f"rung {rung} (epoch {self.rungs[rung]})"
        if by:
            text = (f"MO-ASHA: dominated at {where} by {by} of the {n - 1} trials there; rank {rank + 1} "
                    f"of {n}, the top 1/{self._rf} ({keep}) continue")
        else:
            text = (f"MO-ASHA: on the Pareto front at {where} but crowded out by the epsilon-net "
                    f"tie-break; rank {rank + 1} of {n}, the top 1/{self._rf} ({keep}) continue")
        return {"text": text, "rung": rung, "epoch": self.rungs[rung], "dominated_by": by, "rank": rank + 1,
                "at_rung": n}
