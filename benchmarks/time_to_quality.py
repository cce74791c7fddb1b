"""Time to quality: best validation score against trial-epochs consumed, per search strategy.

Each arm is the real command line (``python -m calotune.search SPACE ...``) on one shared
MLflow store under ``--home``; seeds are interleaved across arms (seed 0 of every arm, then
seed 1, ..., with the arm order rotated per seed so that no arm always runs first on a
cold cache or last on a hot machine). The default space is
``benchmarks/spaces/zdc_swiglu_ttq.yaml``: the ZDC space with ASHA as its authors run it
(grace period 1, reduction factor 3, 9 epochs: rungs at 1, 3 and 9). Arms:

- ``random``: random sampling without early stopping, ``--trials`` (8) trials of 9 epochs:
  the reference whose final score the others must reach, and whose compute they get;
- ``tpe+asha``: TPE (Bergstra et al. 2011) with ASHA (Li et al. arXiv 1810.05934), the
  default of a one-objective space, with ``--stop-trials`` (default 3x ``--trials``)
  trials: a stopped trial costs 1 or 3 epochs, so three times the trials spend about the
  reference's compute, as a user with a fixed compute budget would run it;
- ``wandb``: a W&B-style random sweep, ``method: random`` with ``early_terminate: {type:
  hyperband, min_iter: 1, eta: 3}`` (docs.wandb.ai/models/sweeps/sweep-config-keys).
  W&B's stopper (wandb/sweeps ``hyperband_stopping.py``) checks a run at the bands
  ``min_iter * eta**k`` and stops it if it is not in the top ``1/eta`` of the runs seen at
  that band, without pausing: asynchronous successive halving on random configurations,
  so it runs as ``--sampler random --scheduler asha`` with the space's grace period
  (``min_iter``) and reduction factor (``eta``), ``--stop-trials`` trials. (Ray Tune's
  synchronous ``HyperBandScheduler``, which pauses and resumes trials, is the optional
  arm ``hyperband``.);
- ``warm``: ``tpe+asha`` started with ``--warm-start SOURCE``, by default the detector's
  production model (``models:/NAME@production``): its configuration is the first trial
  and the trials of the search that produced it are TPE's history. If the store has no
  production model, the benchmark first runs "last month's campaign": one larger search
  (``--warm-source-arm``, default ``tpe``: TPE with every trial run to the end; seed
  ``--warm-source-seed``; ``--warm-source-trials``, default 3x that arm's trials), not
  counted in any curve, and promotes its best model. The cold
  counterpart is the ``tpe+asha`` arm of the same seed (same budget, sampler, scheduler).

For every search the benchmark reads the store back: per trial the epochs it reported
(trial-epochs, the compute) and its per-epoch validation objective ``<metric>_epoch``, in
the order the reports reached the store. A report counts the moment it is made: the trial
keeps its best epoch's model, so every reported value is a model the search could return.
Values of failed (or orphaned) trials count as compute but never as quality. The curve is
"best validation objective so far against cumulative trial-epochs"; the final held-out
score is the search's ``best_test_<metric>`` (the best trial scored on the test split,
at the search's own end: an early-stopping arm may have used a little more or less
compute than the reference, which the JSON records per seed).

Output: median and range over seeds per arm; every arm's validation score at the same
seed's reference compute (equal trial-epochs); the compute each arm needs to reach the
median final validation score of ``random``, as a fraction of random's median total
trial-epochs (the target is 1/3 or less), from the median curves and per seed; warm
against cold per seed at equal trial-epochs and held out; the rank correlation between
early-epoch and final validation scores of the reference's trials (what successive
halving relies on); JSON and PNGs. A run that has already finished (same arm, seed and
budget in ``<home>/runs.jsonl``) is not repeated, so an interrupted benchmark continues
with the same command, and ``--report-only`` rebuilds the JSON and plots from what is there.

    python benchmarks/time_to_quality.py --home /tmp/ttq/home --seeds 0-9 \
        --json benchmarks/figures/ttq_zdc_swiglu.json --plot benchmarks/figures/ttq_zdc_swiglu.png
    python benchmarks/time_to_quality.py --home /tmp/ttq/warm --seeds 0-9 --arms tpe+asha,warm \
        --json benchmarks/figures/warm_start_zdc.json --warm-plot benchmarks/figures/warm_start_zdc.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthetic_hpo import parse_seeds  # one rule for --seeds (this folder is on sys.path)

log = logging.getLogger("bench.ttq")

REPO = Path(__file__).resolve().parents[1]

#: arm -> the search flags that make it (the warm source is appended at run time).
ARMS: dict[str, list[str]] = {
    "tpe+asha": ["--sampler", "tpe", "--scheduler", "asha"],
    "random": ["--sampler", "random", "--scheduler", "none"],
    # W&B's hyperband early_terminate stops a run at min_iter * eta**k when it is below the
    # top 1/eta of the runs seen there, without pausing: asynchronous successive halving on
    # a random sweep, with min_iter = the space's grace_period and eta = its reduction_factor.
    "wandb": ["--sampler", "random", "--scheduler", "asha"],
    # Ray Tune's synchronous HyperBand (pauses and resumes trials); not in the default arms.
    "hyperband": ["--sampler", "random", "--scheduler", "hyperband"],
    "warm": ["--sampler", "tpe", "--scheduler", "asha", "--warm-start"],
    # TPE on full-length trials only: the default warm source ("last month's campaign"),
    # not in the default arms.
    "tpe": ["--sampler", "tpe", "--scheduler", "none"],
}
#: Arms that stop trials early: they get ``--stop-trials`` trials instead of ``--trials``.
STOPPING_ARMS = ("tpe+asha", "wandb", "hyperband", "warm")
DEFAULT_ARMS = "random,tpe+asha,wandb,warm"
REFERENCE_ARM = "random"
#: The cold counterpart of the warm arm: same sampler, scheduler, budget and seed.
COLD_ARM = "tpe+asha"
TARGET_FRACTION = 1 / 3
COLORS = {"tpe+asha": "tab:blue", "random": "tab:gray", "wandb": "tab:orange", "warm": "tab:green",
          "hyperband": "tab:purple"}
DEFAULT_SPACE = str(Path(__file__).resolve().parent / "spaces" / "zdc_swiglu_ttq.yaml")


# --- reading one search back from the store ---------------------------------------------------
@dataclass
class SearchResult:
    """What one search cost and found, read from its MLflow records."""

    search: str
    total_epochs: int
    #: (cumulative trial-epochs, best validation objective so far), one point per report that
    #: carried a usable value; compute of failed trials advances x without a point.
    curve: list[tuple[int, float]]
    final_validation: float
    final_test: float | None
    default_test: float | None
    n_trials: int
    states: dict[str, int] = field(default_factory=dict)
    search_wall_s: float | None = None
    #: per usable trial, its validation objective by epoch (for the rank correlations)
    histories: list[dict[int, float]] = field(default_factory=list)


def best_so_far_curve(reports: list[tuple[int, int, float, bool]], mode: str) -> tuple[list[tuple[int, float]], int]:
    """The time-to-quality curve from epoch reports ``(timestamp_ms, step, value, usable)``.

    Reports are taken in the order they reached the store (ties by step); each one is one
    trial-epoch of compute. Returns the points (cumulative trial-epochs, best so far) at
    every usable report, and the total trial-epochs.
    """
    sign = 1.0 if mode == "min" else -1.0
    best = math.inf
    points: list[tuple[int, float]] = []
    total = 0
    for _ts, _step, value, usable in sorted(reports, key=lambda r: (r[0], r[1])):
        total += 1
        if usable and math.isfinite(value) and sign * value < best:
            best = sign * value
        if math.isfinite(best):
            points.append((total, sign * best))
    return points, total


def read_search(client: Any, experiment_id: str, search: str, metric: str, mode: str) -> SearchResult:
    """One search's trial-epochs, curve and held-out score, from the store."""
    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`calotune.search` = '{search}' and tags.`calotune.kind` = 'search'")
    if not parents:
        raise RuntimeError(f"no search run named {search!r} in experiment {experiment_id}")
    parent = parents[0]
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                  f"'{parent.info.run_id}'", max_results=10_000)
    reports: list[tuple[int, int, float, bool]] = []
    states: dict[str, int] = {}
    histories: list[dict[int, float]] = []
    for run in children:
        if run.data.tags.get("calotune.kind") != "trial":
            continue
        state = run.data.tags.get("calotune.state", "unknown")
        states[state] = states.get(state, 0) + 1
        usable = state in ("complete", "pruned") and run.data.tags.get("calotune.orphaned") != "true"
        history = client.get_metric_history(run.info.run_id, f"{metric}_epoch")
        for m in history:
            reports.append((int(m.timestamp), int(m.step), float(m.value), usable))
        if usable:
            histories.append({int(m.step): float(m.value) for m in history})
    curve, total = best_so_far_curve(reports, mode)
    pm = parent.data.metrics
    return SearchResult(
        search=search, total_epochs=total, curve=curve,
        final_validation=curve[-1][1] if curve else math.nan,
        final_test=pm.get(f"best_test_{metric}"), default_test=pm.get(f"default_test_{metric}"),
        n_trials=sum(states.values()), states=states, search_wall_s=pm.get("search_wall_s"),
        histories=histories)


def value_at(curve: list[tuple[int, float]], x: int) -> float:
    """The best-so-far value after ``x`` trial-epochs (NaN before the first usable report;
    the final value after the search ended: that is what it returns)."""
    value = math.nan
    for cx, cy in curve:
        if cx > x:
            break
        value = cy
    return value


def first_reaching(curve: list[tuple[int, float]], target: float, mode: str) -> int | None:
    """Trial-epochs at which the curve first reaches ``target`` (None if it never does)."""
    for x, y in curve:
        if (y <= target) if mode == "min" else (y >= target):
            return x
    return None


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 pairs."""
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else None


def rung_correlations(results: dict[int, SearchResult], final_epoch: int, epochs: list[int]) -> dict[str, Any]:
    """How well an early epoch's score ranks the trials by their final score.

    Uses the trials that ran all ``final_epoch`` epochs (the reference arm's all do); per
    early epoch, Spearman's rho between the epoch's value and the final epoch's, per seed
    and pooled over seeds (each seed's values centred on its own median first, since seeds
    differ in data). A low rho is why successive halving stops good trials early.
    """
    out: dict[str, Any] = {"final_epoch": final_epoch}
    for e in epochs:
        per_seed, pooled_x, pooled_y = [], [], []
        for r in results.values():
            pairs = [(h[e], h[final_epoch]) for h in r.histories if e in h and final_epoch in h
                     and math.isfinite(h[e]) and math.isfinite(h[final_epoch])]
            if len(pairs) < 3:
                continue
            rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
            if rho is not None:
                per_seed.append(rho)
            mx, my = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
            pooled_x += [a - mx for a, _ in pairs]
            pooled_y += [b - my for _, b in pairs]
        out[f"epoch_{e}"] = {"per_seed": spread(per_seed), "pooled": spearman(pooled_x, pooled_y),
                             "pooled_trials": len(pooled_x)}
    return out


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of the finite values (NaN and None dropped), and how many there were."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def aggregate(results: dict[str, dict[int, SearchResult]], mode: str,
              reference: str = REFERENCE_ARM) -> dict[str, Any]:
    """Per-arm medians and ranges over seeds, median curves, and compute to the reference's final."""
    out: dict[str, Any] = {"arms": {}, "curves": {}}
    ref = results.get(reference, {})
    ref_final = spread([r.final_validation for r in ref.values()])["median"]
    ref_total = spread([r.total_epochs for r in ref.values()])["median"]
    out["reference"] = {"arm": reference, "final_validation_median": ref_final,
                        "total_trial_epochs_median": ref_total, "target_fraction": TARGET_FRACTION}
    for arm, by_seed in results.items():
        if not by_seed:
            continue
        xmax = max(r.total_epochs for r in by_seed.values())
        xs = list(range(1, xmax + 1))
        per_seed = [[value_at(r.curve, x) for x in xs] for r in by_seed.values()]
        med, lo, hi = [], [], []
        for column in zip(*per_seed, strict=True):
            finite = [v for v in column if math.isfinite(v)]
            med.append(statistics.median(finite) if finite else None)
            lo.append(min(finite) if finite else None)
            hi.append(max(finite) if finite else None)
        out["curves"][arm] = {"x": xs, "median": med, "min": lo, "max": hi}
        entry: dict[str, Any] = {
            "seeds": sorted(by_seed),
            "searches": {str(s): r.search for s, r in sorted(by_seed.items())},
            "final_test": spread([r.final_test for r in by_seed.values()]),
            "default_test": spread([r.default_test for r in by_seed.values()]),
            "final_validation": spread([r.final_validation for r in by_seed.values()]),
            "trial_epochs": spread([r.total_epochs for r in by_seed.values()]),
            "search_wall_s": spread([r.search_wall_s for r in by_seed.values()]),
            "trial_states": {s: r.states for s, r in sorted(by_seed.items())},
            # validation score after as many trial-epochs as the same seed's reference used
            "validation_at_reference_total": {
                str(s): value_at(r.curve, ref[s].total_epochs) for s, r in sorted(by_seed.items()) if s in ref},
        }
        if ref_final is not None and ref_total:
            median_curve = [(x, y) for x, y in zip(xs, med, strict=True) if y is not None]
            reach = first_reaching(median_curve, ref_final, mode)
            fractions, reached = [], 0
            for seed, r in by_seed.items():
                if seed not in ref:
                    continue
                x = first_reaching(r.curve, ref[seed].final_validation, mode)
                if x is not None:
                    reached += 1
                    fractions.append(x / ref[seed].total_epochs)
            entry["to_reference_final"] = {
                "trial_epochs_median_curve": reach,
                "fraction_of_reference_total": None if reach is None else reach / ref_total,
                "meets_target": None if reach is None else reach / ref_total <= TARGET_FRACTION,
                "per_seed_fraction": spread(fractions),
                "per_seed_reached": f"{reached}/{sum(1 for s in by_seed if s in ref)}",
            }
        out["arms"][arm] = entry
    if "warm" in results and COLD_ARM in results:
        out["warm_vs_cold"] = warm_vs_cold(results["warm"], results[COLD_ARM], mode)
    return out


def warm_vs_cold(warm: dict[int, SearchResult], cold: dict[int, SearchResult], mode: str) -> dict[str, Any]:
    """Per seed, warm against cold at equal compute (the smaller of the two totals) and held out.

    Positive differences mean warm is better (lower for ``min``)."""
    sign = 1.0 if mode == "min" else -1.0
    rows, wins_val, wins_test, n = {}, 0, 0, 0
    for seed in sorted(set(warm) & set(cold)):
        w, c = warm[seed], cold[seed]
        x = min(w.total_epochs, c.total_epochs)
        wv, cv = value_at(w.curve, x), value_at(c.curve, x)
        dv = sign * (cv - wv) if math.isfinite(wv) and math.isfinite(cv) else None
        dt = (sign * (c.final_test - w.final_test)
              if w.final_test is not None and c.final_test is not None else None)
        n += 1
        wins_val += dv is not None and dv > 0
        wins_test += dt is not None and dt > 0
        rows[str(seed)] = {"equal_trial_epochs": x, "warm_validation": wv, "cold_validation": cv,
                           "validation_gain": dv, "warm_test": w.final_test, "cold_test": c.final_test,
                           "test_gain": dt, "warm_total": w.total_epochs, "cold_total": c.total_epochs}
    gains_v = [r["validation_gain"] for r in rows.values() if r["validation_gain"] is not None]
    gains_t = [r["test_gain"] for r in rows.values() if r["test_gain"] is not None]
    return {"per_seed": rows, "warm_wins_validation": f"{wins_val}/{n}", "warm_wins_test": f"{wins_test}/{n}",
            "validation_gain": spread(gains_v), "test_gain": spread(gains_t), "cold_arm": COLD_ARM}


# --- running -------------------------------------------------------------------------------
def interleaved(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Seed by seed, every arm once, the arm order rotated by one each seed."""
    order = []
    for i, seed in enumerate(seeds):
        k = i % len(arms)
        order.extend((arm, seed) for arm in arms[k:] + arms[:k])
    return order


def arm_trials(args: argparse.Namespace, arm: str) -> int:
    """Trials of one arm: ``--stop-trials`` for an arm that stops trials early, else ``--trials``.

    An arm that stops most trials after 1 or 3 of 9 epochs spends about a third of the
    epochs per trial; given three times the trials it spends about the reference's compute,
    which is how a user with a fixed compute budget would run it."""
    if arm == "warm-source":
        return args.warm_source_trials
    return args.stop_trials if arm in STOPPING_ARMS else args.trials


def budget_flags(args: argparse.Namespace, trials: int) -> list[str]:
    flags = ["--trials", str(trials)]
    for flag, value in (("--max-epochs", args.max_epochs), ("--events", args.events),
                        ("--max-concurrent", args.max_concurrent)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def budget_key(args: argparse.Namespace) -> dict[str, Any]:
    return {"space": args.space, "trials": args.trials, "stop_trials": args.stop_trials,
            "max_epochs": args.max_epochs, "events": args.events, "max_concurrent": args.max_concurrent}


def same_budget(recorded: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    """Whether a ledger row was run with this budget. The space is compared by file name,
    not path: a run from a snapshot of the tree (``/tmp/ttq-src/benchmarks/spaces/...``)
    is reported from the working tree with the default ``--space``."""
    if not recorded:
        return False
    def norm(budget: dict[str, Any]) -> dict[str, Any]:
        return {**budget, "space": Path(str(budget.get("space", ""))).name}
    return norm(recorded) == norm(key)


def search_names(client: Any, experiment: str) -> set[str]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`calotune.kind` = 'search'",
                              max_results=10_000)
    return {r.data.tags["calotune.search"] for r in runs}


def run_search(cmd: list[str], log_path: Path, client_factory, experiment: str) -> tuple[int, float, str | None]:
    """Run one search command; (exit status, wall seconds, the new search's name).

    The name is the one search run that appeared in the store meanwhile (the command
    prints it too, but the store is the record this benchmark reads anyway)."""
    db = log_path.parents[1] / "mlflow.db"
    before = search_names(client_factory(), experiment) if db.exists() else set()
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    wall = time.perf_counter() - t0
    new = sorted(search_names(client_factory(), experiment) - before)
    return rc, wall, new[-1] if new else None


def warm_start_available() -> bool:
    """Whether ``python -m calotune.search`` offers ``--warm-start`` (the warm arm needs it)."""
    out = subprocess.run([sys.executable, "-m", "calotune.search", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    return "--warm-start" in out.stdout


def has_alias(client: Any, name: str, alias: str) -> bool:
    try:
        client.get_model_version_by_alias(name, alias)
        return True
    except Exception:  # absent model or alias: MLflow raises its own exception types
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=DEFAULT_SPACE,
                   help="search space (name or YAML path; default benchmarks/spaces/zdc_swiglu_ttq.yaml)")
    p.add_argument("--seeds", default="0-4", help="seeds, a list (0,1,2) or a range (0-4); default 0-4")
    p.add_argument("--trials", type=int, default=8,
                   help="trials of the arms without early stopping (random; default 8)")
    p.add_argument("--stop-trials", type=int, default=None,
                   help=f"trials of the arms that stop early ({', '.join(STOPPING_ARMS)}); default 3x --trials")
    p.add_argument("--max-epochs", type=int, default=9, help="epochs per trial (default 9: ASHA rungs 1, 3, 9)")
    p.add_argument("--events", type=int, default=1500,
                   help="synthetic events (default 1500: 900 train / 300 validation / 300 test)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once per search (default 2)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}; default {DEFAULT_ARMS}")
    p.add_argument("--warm-start", dest="warm_source", default=None,
                   help="source for the warm arm (default: models:/NAME@production of the space's detector)")
    p.add_argument("--warm-source-seed", type=int, default=100,
                   help="seed of the reference search promoted to production when the store has none")
    p.add_argument("--warm-source-arm", default="tpe", choices=sorted(set(ARMS) - {"warm"}),
                   help="how that earlier campaign searched (default tpe: TPE, every trial run to the "
                        "end; tpe+asha was the first measurement's)")
    p.add_argument("--warm-source-trials", type=int, default=None,
                   help="trials of that earlier campaign; default 3x the arm's own trials "
                        "(3x --trials for tpe, 3x --stop-trials for an early-stopping arm)")
    p.add_argument("--home", type=Path, default=Path("/tmp/ttq/home"), help="shared --home of every search")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="PNG of the curves (e.g. benchmarks/figures/ttq_zdc_swiglu.png)")
    p.add_argument("--warm-plot", type=Path,
                   help="PNG of warm against cold per seed (e.g. benchmarks/figures/warm_start_zdc.png)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report what --home holds")
    args = p.parse_args(argv)
    if args.stop_trials is None:
        args.stop_trials = 3 * args.trials
    if args.warm_source_trials is None:
        args.warm_source_trials = 3 * (args.stop_trials if args.warm_source_arm in STOPPING_ARMS else args.trials)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from mlflow.tracking import MlflowClient

    from calotune.detectors import get_detector
    from calotune.spec import load_spec
    from calotune.tracking.registry import registered_model_name

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    seeds = parse_seeds(args.seeds)
    notes: list[str] = []
    if "warm" in arms and not args.report_only and not warm_start_available():
        arms.remove("warm")
        notes.append("arm 'warm' skipped: this calotune.search has no --warm-start flag yet")
        log.warning(notes[-1])
    spec = load_spec(args.space)
    metric, mode = spec.objective.metric, spec.objective.mode
    model_name = registered_model_name(spec.detector, get_detector(spec.detector, **spec.geometry).geometry_dict(),
                                       get_detector(spec.detector).geometry_dict())
    warm_source = args.warm_source or f"models:/{model_name}@production"
    home = args.home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"

    def client() -> Any:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    ledger = home / "runs.jsonl"
    key = budget_key(args)
    py = sys.executable

    def done_runs() -> list[dict[str, Any]]:
        if not ledger.is_file():
            return []
        rows = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        return [r for r in rows if same_budget(r.get("budget"), key) and r.get("rc") == 0 and r.get("search")]

    def record(row: dict[str, Any]) -> None:
        with ledger.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def base(arm: str) -> list[str]:
        return [py, "-m", "calotune.search", args.space, *budget_flags(args, arm_trials(args, arm)),
                "--home", str(home)]

    if not args.report_only:
        if "warm" in arms and args.warm_source is None and not (
                (home / "mlflow.db").exists() and has_alias(client(), model_name, "production")):
            log.info("warm arm: no %s yet; running the reference search (seed %d) and promoting it",
                     warm_source, args.warm_source_seed)
            cmd = [*base("warm-source"), *ARMS[args.warm_source_arm], "--seed", str(args.warm_source_seed)]
            rc, wall, name = run_search(cmd, home / "logs" / "warm-source.log", client, spec.name)
            record({"arm": "warm-source", "seed": args.warm_source_seed, "search": name, "rc": rc,
                    "wall_s": wall, "budget": key, "command": shlex.join(cmd),
                    "source_arm": args.warm_source_arm})
            promote = [py, "-m", "calotune.promote", model_name, "--home", str(home)]
            prc = subprocess.run(promote, cwd=REPO, capture_output=True, text=True)
            if rc != 0 or prc.returncode != 0:
                raise SystemExit(f"warm source failed (search rc {rc}, promote rc {prc.returncode}): "
                                 f"{prc.stderr.strip()[-500:]}; see {home / 'logs' / 'warm-source.log'}")
        finished = {(r["arm"], r["seed"]) for r in done_runs()}
        for arm, seed in interleaved(arms, seeds):
            if (arm, seed) in finished:
                log.info("%s seed %d: already in %s, skipped", arm, seed, ledger)
                continue
            flags = [*ARMS[arm], warm_source] if arm == "warm" else ARMS[arm]
            cmd = [*base(arm), *flags, "--seed", str(seed)]
            load_before = os.getloadavg()
            rc, wall, name = run_search(cmd, home / "logs" / f"{arm}-s{seed}.log", client, spec.name)
            record({"arm": arm, "seed": seed, "search": name, "rc": rc, "wall_s": wall, "budget": key,
                    "load_before": load_before, "load_after": os.getloadavg(), "command": shlex.join(cmd)})
            log.info("%s seed %d: rc %d, %.0f s, %s (load %.1f -> %.1f)", arm, seed, rc, wall, name,
                     load_before[0], os.getloadavg()[0])

    rows = [r for r in done_runs() if r["arm"] in arms and r["seed"] in seeds]
    if not rows:
        raise SystemExit(f"no finished run of arms {', '.join(arms)} with this budget in {ledger}")
    exp = client().get_experiment_by_name(spec.name)
    results: dict[str, dict[int, SearchResult]] = {arm: {} for arm in arms}
    for r in rows:
        results[r["arm"]][r["seed"]] = read_search(client(), exp.experiment_id, r["search"], metric, mode)
    summary = aggregate(results, mode)
    if REFERENCE_ARM in results:
        summary["rank_correlation"] = rung_correlations(results[REFERENCE_ARM], args.max_epochs,
                                                        [e for e in (1, 3) if e < args.max_epochs])
    warm_source_search = None
    source_rows = [r for r in done_runs() if r["arm"] == "warm-source"]
    if "warm" in arms and source_rows:
        src = read_search(client(), exp.experiment_id, source_rows[-1]["search"], metric, mode)
        warm_source_search = {"search": src.search, "seed": source_rows[-1]["seed"], "trials": src.n_trials,
                              # the first measurement's ledger predates the key: its source was tpe+asha
                              "arm": source_rows[-1].get("source_arm", "tpe+asha"),
                              "trial_epochs": src.total_epochs, "final_validation": src.final_validation,
                              "final_test": src.final_test, "command": source_rows[-1]["command"]}
    walls: dict[str, list[float]] = {}
    loads: list[float] = []
    for r in rows:
        walls.setdefault(r["arm"], []).append(r["wall_s"])
        loads += [r.get("load_before", [math.nan])[0], r.get("load_after", [math.nan])[0]]
    for arm, entry in summary["arms"].items():
        entry["command_wall_s"] = spread(walls.get(arm, []))
    summary.update({
        "space": args.space, "objective": {"metric": metric, "mode": mode},
        "budget": {"trials": args.trials, "stop_trials": args.stop_trials, "max_epochs": args.max_epochs,
                   "events": args.events, "max_concurrent": args.max_concurrent,
                   "warm_source_trials": args.warm_source_trials, "warm_source_seed": args.warm_source_seed,
                   "warm_source_arm": args.warm_source_arm},
        "seeds": seeds, "arms_requested": arms, "warm_source": warm_source if "warm" in arms else None,
        "load_average_1min": spread(loads), "cpus": os.cpu_count(),
        "command": shlex.join([py, "benchmarks/time_to_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "search_command": {a: shlex.join([*base(a), *ARMS[a], "--seed", "S"]) for a in arms},
        "warm_source_search": warm_source_search,
        "arm_flags": {a: ARMS[a] + ([warm_source] if a == "warm" else []) for a in arms},
        "missing": [f"{a} seed {s}" for a in arms for s in seeds if s not in results[a]],
        "notes": notes,
    })
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.plot:
        plot(summary, args.plot, metric, mode)
    if args.warm_plot and "warm" in results and COLD_ARM in results:
        plot_warm(results, summary, args.warm_plot, metric, mode)
    print(report(summary))
    return 0


def report(summary: dict[str, Any]) -> str:
    """A short table: final scores, compute, and compute to the reference's final score."""
    ref = summary["reference"]
    lines = [f"{summary['space']}: {summary['objective']['metric']} ({summary['objective']['mode']}); "
             f"budget {summary['budget']}; seeds {summary['seeds']}",
             f"reference ({ref['arm']}): final validation median {_f(ref['final_validation_median'])}, "
             f"total trial-epochs median {_f(ref['total_trial_epochs_median'])}",
             f"{'arm':10} {'seeds':>5} {'held-out median [range]':>30} {'trial-epochs':>18} "
             f"{'to ref final (median curve)':>28} {'per seed':>22}"]
    for arm, e in summary["arms"].items():
        t, c = e["final_test"], e["trial_epochs"]
        reach = e.get("to_reference_final", {})
        frac = reach.get("fraction_of_reference_total")
        ps = reach.get("per_seed_fraction", {})
        where = ("-" if not reach else "never" if frac is None
                 else f"{frac:.2f} ({reach.get('trial_epochs_median_curve')} ep)")
        lines.append(
            f"{arm:10} {len(e['seeds']):>5} {_f(t['median']):>10} [{_f(t['min'])}, {_f(t['max'])}]"
            f" {_f(c['median']):>6} [{_f(c['min'])}-{_f(c['max'])}]"
            f" {where:>28}"
            f" {_f(ps.get('median'))} ({reach.get('per_seed_reached', '-')})")
    for arm, e in summary["arms"].items():
        at = [v for v in e.get("validation_at_reference_total", {}).values() if v is not None and math.isfinite(v)]
        if at:
            lines.append(f"{arm:10} validation at the reference's trial-epochs, median {_f(statistics.median(at))} "
                         f"[{_f(min(at))}, {_f(max(at))}]")
    wc = summary.get("warm_vs_cold")
    if wc:
        lines.append(f"warm vs {wc['cold_arm']}: warm better on validation at equal trial-epochs in "
                     f"{wc['warm_wins_validation']} seeds (median gain {_f(wc['validation_gain']['median'])}), "
                     f"on held-out in {wc['warm_wins_test']} (median gain {_f(wc['test_gain']['median'])})")
    rc = summary.get("rank_correlation")
    if rc:
        for k, v in rc.items():
            if k.startswith("epoch_"):
                lines.append(f"{ref['arm']}: Spearman rho of {k} vs epoch {rc['final_epoch']} validation, "
                             f"per seed median {_f(v['per_seed']['median'])}, pooled {_f(v['pooled'])} "
                             f"({v['pooled_trials']} trials)")
    if summary["missing"]:
        lines.append(f"missing: {', '.join(summary['missing'])}")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def plot(summary: dict[str, Any], path: Path, metric: str, mode: str) -> None:
    """Median best-so-far curve with its min-max band per arm, and the held-out scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    for arm, c in summary["curves"].items():
        xs = [x for x, m in zip(c["x"], c["median"], strict=True) if m is not None]
        med = [m for m in c["median"] if m is not None]
        lo = [m for m in c["min"] if m is not None]
        hi = [m for m in c["max"] if m is not None]
        n = len(summary["arms"][arm]["seeds"])
        ax.step(xs, med, where="post", color=COLORS.get(arm), label=f"{arm} (median of {n})")
        ax.fill_between(xs, lo, hi, step="post", color=COLORS.get(arm), alpha=0.15)
    ref = summary["reference"]
    if ref["final_validation_median"] is not None:
        ax.axhline(ref["final_validation_median"], color="k", ls="--", lw=0.8,
                   label=f"{ref['arm']} final (median)")
        ax.axvline(ref["total_trial_epochs_median"] * TARGET_FRACTION, color="k", ls=":", lw=0.8,
                   label=f"1/3 of {ref['arm']}'s compute")
        ax.axvline(ref["total_trial_epochs_median"], color="k", ls="-.", lw=0.6,
                   label=f"{ref['arm']}'s compute (equal-budget cut)")
    ax.set_xlabel("trial-epochs consumed")
    ax.set_ylabel(f"best validation {metric} so far ({mode})")
    b = summary["budget"]
    ax.set_title(f"{Path(summary['space']).stem}: random {b['trials']} trials, early-stopping arms "
                 f"{b['stop_trials']} trials, <= {b['max_epochs']} epochs each, {b['events']} events; "
                 f"band = range over seeds", fontsize=8)
    ax.legend(fontsize=8)
    arms = list(summary["arms"])
    for i, arm in enumerate(arms):
        vals = summary["arms"][arm]["final_test"]["values"]
        bx.scatter([i] * len(vals), vals, color=COLORS.get(arm), s=18)
        if vals:
            bx.hlines(statistics.median(vals), i - 0.3, i + 0.3, color=COLORS.get(arm))
    bx.set_xticks(range(len(arms)), arms, fontsize=8)
    bx.set_ylabel(f"held-out test {metric}, best trial")
    bx.set_title("final held-out score per seed (bar: median)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_warm(results: dict[str, dict[int, SearchResult]], summary: dict[str, Any], path: Path,
              metric: str, mode: str) -> None:
    """Warm against cold, one panel per seed: best validation so far against trial-epochs,
    with the production model's validation score and the held-out scores in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(set(results["warm"]) & set(results[COLD_ARM]))
    if not seeds:
        return
    ncols = min(5, len(seeds))
    nrows = math.ceil(len(seeds) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 0.6, 3.0 * nrows + 0.6), sharey=True,
                             squeeze=False)
    src = summary.get("warm_source_search") or {}
    for ax in axes.flat[len(seeds):]:
        ax.set_visible(False)
    for ax, seed in zip(axes.flat, seeds, strict=False):
        for arm, color in ((COLD_ARM, "tab:blue"), ("warm", "tab:green")):
            r = results[arm][seed]
            xs, ys = [x for x, _ in r.curve], [y for _, y in r.curve]
            label = f"{'cold' if arm == COLD_ARM else 'warm'}: held-out {_f(r.final_test)}"
            ax.step(xs, ys, where="post", color=color, label=label)
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("trial-epochs")
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel(f"best validation {metric}\nso far ({mode})")
    wc = summary.get("warm_vs_cold", {})
    fig.suptitle(f"warm start from production (source search: {src.get('arm', '?')}, "
                 f"{src.get('trials', '?')} trials, seed "
                 f"{src.get('seed', '?')}, held-out {_f(src.get('final_test'))}) vs cold "
                 f"{COLD_ARM}, same seed and budget\n"
                 f"warm better at equal trial-epochs on {wc.get('warm_wins_validation', '?')} seeds, "
                 f"held-out on {wc.get('warm_wins_test', '?')}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
