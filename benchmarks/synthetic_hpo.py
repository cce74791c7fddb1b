"""The samplers on a synthetic function with a known optimum: regret, no data, no Ray.

The function is the multi-fidelity Hartmann-6 of Kandasamy et al. (arXiv 1703.06240,
section 5 and appendix), as mf-prior-bench's ``MFHartmann6`` builds it: the Hartmann-6
weights ``alpha`` are flattened at low fidelity, ``alpha' = alpha - bias * (1 - s)`` with
``s`` the fidelity scaled to [0, 1] on a log scale, and a non-negative noise term
``|N(0, 1)| * noise * (1 - s)``, drawn from a seed that depends only on the point and the
fidelity (the same query gives the same answer). At the highest fidelity the value is the
noise-free Hartmann-6, whose minimum is -3.32237 at (0.20169, 0.150011, 0.476874,
0.275332, 0.311652, 0.6573) (Surjanovic & Bingham's test-function library). A fidelity
step plays the part of a training epoch, so a pruned trial costs fewer "trial-epochs".

mf-prior-bench itself is not a dependency: it pins ``numpy<2`` (calotune runs on numpy 2)
and pulls pandas, pyarrow and ConfigSpace for what is a dozen lines of numpy here.

Every sampler of :func:`calotune.tuning.algorithms.make_sampler` runs through plain Optuna,
in-process, seeded, so the numbers are deterministic::

    python benchmarks/synthetic_hpo.py --trials 40 --seeds 0-4 --json /tmp/synthetic_hpo.json

``--pruner asha`` adds Optuna's successive-halving pruner over the fidelity steps (the
analogue of ASHA in a search); the cost is then counted in fidelity steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("bench.synthetic_hpo")

# Hartmann-6 constants (Surjanovic & Bingham, www.sfu.ca/~ssurjano/hart6.html).
ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
A = np.array([[10, 3, 17, 3.5, 1.7, 8],
              [0.05, 10, 17, 0.1, 8, 14],
              [3, 3.5, 1.7, 10, 17, 8],
              [17, 8, 0.05, 10, 0.1, 14]], dtype=float)
P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886],
                     [2329, 4135, 8307, 3736, 1004, 9991],
                     [2348, 1451, 3522, 2883, 3047, 6650],
                     [4047, 8828, 8732, 5743, 1091, 381]], dtype=float)
HARTMANN6_ARGMIN = (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)
HARTMANN6_MIN = -3.32237
PARAMS = tuple(f"x{i}" for i in range(6))
#: samplers that optimise one objective (all of make_sampler's: NSGA-II/III take one too).
SAMPLERS = ("random", "tpe", "cmaes", "gp", "qmc", "nsga2", "nsga3")


@dataclass(frozen=True)
class MFHartmann6:
    """Multi-fidelity Hartmann-6 (Kandasamy et al. arXiv 1703.06240), fidelities 1..n.

    ``bias`` flattens the function at low fidelity (so cheap evaluations rank points
    imperfectly), ``noise`` adds a deterministic non-negative perturbation that vanishes at
    the top fidelity. Defaults as mf-prior-bench's ``mfh6_good`` (bias 1.0, noise 0.1).
    """

    n_fidelities: int = 9
    bias: float = 1.0
    noise: float = 0.1
    seed: int = 1337

    def scaled(self, z: int) -> float:
        """Fidelity ``z`` in [0, 1] on a log scale (1 at the top fidelity)."""
        if self.n_fidelities == 1:
            return 1.0
        return math.log(z) / math.log(self.n_fidelities)

    def __call__(self, x: Any, z: int | None = None) -> float:
        z = self.n_fidelities if z is None else int(z)
        if not 1 <= z <= self.n_fidelities:
            raise ValueError(f"fidelity must be in [1, {self.n_fidelities}], got {z}")
        x = np.asarray(x, dtype=float).reshape(6)
        s = self.scaled(z)
        alpha = ALPHA - self.bias * (1.0 - s)
        value = -float(np.sum(alpha * np.exp(-np.sum(A * (x - P) ** 2, axis=1))))
        if self.noise and s < 1.0:
            key = zlib.crc32(x.tobytes()) ^ (z * 0x9E3779B1) ^ self.seed
            value += abs(np.random.default_rng(key).normal()) * self.noise * (1.0 - s)
        return value


@dataclass
class RunResult:
    sampler: str
    seed: int
    trials: int
    regret: float            # best top-fidelity value found minus the known minimum
    regret_curve: list[float]  # regret after each trial (complete trials only improve it)
    cost: int                # fidelity steps evaluated ("trial-epochs")
    wall_s: float


def run(sampler: str, seed: int, trials: int, fn: MFHartmann6 | None = None,
        pruner: str = "none") -> RunResult:
    """One seeded Optuna study of ``trials`` trials with calotune's sampler ``sampler``.

    ``pruner="none"``: each trial evaluates the top fidelity once (cost ``n_fidelities``,
    as a trial that trains every epoch). ``"asha"``: the trial reports every fidelity step
    and Optuna's successive-halving pruner may stop it (Li et al. arXiv 1810.05934);
    a pruned trial never counts as a result.
    """
    import optuna

    from calotune.tuning.algorithms import make_sampler

    fn = fn or MFHartmann6()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruners = {"none": optuna.pruners.NopPruner(),
               "asha": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)}
    if pruner not in pruners:
        raise ValueError(f"pruner must be one of {', '.join(pruners)}, got {pruner!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler, seed),
                                    pruner=pruners[pruner])
    cost = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal cost
        x = [trial.suggest_float(name, 0.0, 1.0) for name in PARAMS]
        if pruner == "none":
            cost += fn.n_fidelities
            return fn(x)
        value = math.nan
        for z in range(1, fn.n_fidelities + 1):
            cost += 1
            value = fn(x, z)
            trial.report(value, z)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # samplers' experimental / independent-sampling notes
        study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - t0
    best, curve = math.inf, []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        curve.append(best - HARTMANN6_MIN)
    return RunResult(sampler, seed, trials, best - HARTMANN6_MIN, curve, cost, wall)


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise SystemExit(f"--seeds {text!r}: give a list (0,1,2) or a range (0-4)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma list (default: all)")
    p.add_argument("--seeds", default="0-4", help="list (0,1,2) or range (0-4); default 0-4")
    p.add_argument("--trials", type=int, default=40, help="trials per study (default 40)")
    p.add_argument("--pruner", default="none", choices=("none", "asha"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG of median regret against trials per sampler (band: range over seeds)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seeds = parse_seeds(args.seeds)
    out: dict[str, Any] = {"function": "MFHartmann6 (arXiv 1703.06240)", "minimum": HARTMANN6_MIN,
                           "trials": args.trials, "seeds": seeds, "pruner": args.pruner, "samplers": {}}
    print(f"MFHartmann6, {args.trials} trials, seeds {seeds}, pruner {args.pruner}: regret (best - minimum)")
    print(f"{'sampler':8} {'median':>8} {'min':>8} {'max':>8} {'cost':>6} {'wall s':>7}")
    curves: dict[str, list[list[float]]] = {}
    for name in args.samplers.split(","):
        runs = [run(name, seed, args.trials, pruner=args.pruner) for seed in seeds]
        curves[name] = [r.regret_curve for r in runs]
        regrets = [r.regret for r in runs]
        out["samplers"][name] = {"regret": {"median": statistics.median(regrets), "min": min(regrets),
                                            "max": max(regrets), "values": regrets},
                                 "cost_median": statistics.median(r.cost for r in runs),
                                 "wall_s_median": statistics.median(r.wall_s for r in runs)}
        print(f"{name:8} {statistics.median(regrets):8.4f} {min(regrets):8.4f} {max(regrets):8.4f} "
              f"{statistics.median(r.cost for r in runs):6.0f} {statistics.median(r.wall_s for r in runs):7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        plot(curves, args.plot, f"MFHartmann6 (arXiv 1703.06240), {len(seeds)} seeds, pruner {args.pruner}")
    return 0


def plot(curves: dict[str, list[list[float]]], path: str, title: str) -> None:
    """Median regret after each trial, per sampler, with the range over seeds (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_seed in curves.items():
        arr = np.array(per_seed)  # (seeds, trials); inf before the first complete trial
        arr = np.where(np.isfinite(arr), arr, np.nan)
        xs = np.arange(1, arr.shape[1] + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before any result
            (line,) = ax.plot(xs, np.nanmedian(arr, axis=0), label=name)
            ax.fill_between(xs, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=line.get_color(),
                            alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("trials")
    ax.set_ylabel("regret: best value found - known minimum")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
