"""Pareto fronts of multi-objective searches and the rule that picks one model from them.

A search over fidelity and generation speed has no single best trial; the YAML's
``select`` names how to choose the one to register: ``first`` (best on the first
objective within the front), an objective name, or ``knee`` (closest to the ideal point
after scaling every objective to [0, 1] over the front).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _oriented(point: Sequence[float], modes: Sequence[str]) -> list[float]:
    return [v if m == "min" else -v for v, m in zip(point, modes, strict=True)]


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (each objective minimised or maximised)."""
    oriented = [_oriented(p, modes) for p in points]
    front = []
    for i, a in enumerate(oriented):
        dominated = any(
            all(x <= y for x, y in zip(b, a, strict=True)) and any(x < y for x, y in zip(b, a, strict=True))
            for j, b in enumerate(oriented) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def select(points: Sequence[Sequence[float]], modes: Sequence[str], names: Sequence[str], rule: str) -> int:
    """Index of the point the ``rule`` picks from the Pareto front of ``points``."""
    front = pareto_front(points, modes)
    oriented = {i: _oriented(points[i], modes) for i in front}
    if rule in ("first", names[0]):
        return min(front, key=lambda i: oriented[i])
    if rule in names:
        k = list(names).index(rule)
        return min(front, key=lambda i: (oriented[i][k], oriented[i]))
    if rule != "knee":
        raise ValueError(f"unknown selection rule {rule!r}")
    lows = [min(oriented[i][k] for i in front) for k in range(len(names))]
    highs = [max(oriented[i][k] for i in front) for k in range(len(names))]

    def distance(i: int) -> float:
        return math.sqrt(sum(((oriented[i][k] - lo) / (hi - lo) if hi > lo else 0.0) ** 2
                             for k, (lo, hi) in enumerate(zip(lows, highs, strict=True))))

    return min(front, key=lambda i: (distance(i), oriented[i]))
