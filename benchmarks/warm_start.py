"""Warm start against cold start at equal budget: best validation score against trials.

Three real searches of one space on one store under ``--home``:

1. a reference search (``--reference-seed``), whose best model is promoted to production:
   the "earlier campaign" a warm start reuses (skipped when production exists; only the
   promotion runs when a finished search already registered a candidate);
2. a warm search, ``--warm-start models:/NAME@production`` (the production configuration
   first, then TPE seeded with the reference search's trials), seed ``--seed``;
3. a cold search with the same seed, budget and data, run at the same time as the warm
   one (``--sequential`` runs them one after the other). The comparison is per trial, not
   per second, so sharing the machine changes the wall times only (and, through the order
   in which results reach ASHA, which trials are stopped; both arms alike).

The warm source is named explicitly rather than with the bare flag: the bare flag would
also take the cold search's history if the cold one finished first. For each search the
store is read back: per trial (in start order) the final validation objective; the curve
is the best so far against trials, and the held-out score is ``best_test_<metric>``.

    python benchmarks/warm_start.py --home /tmp/warm/home --json /tmp/warm/warm_start.json \
        --plot /tmp/warm/warm_start.png

(``benchmarks/figures/warm_start_zdc.*`` are the multi-seed figures of
``time_to_quality.py --arms tpe+asha,warm``, not this script's.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.warm")


def run(*cmds: list[str], log_dir: Path) -> list[float]:
    """Run calotune command lines at the same time; their wall times (exit on a failure)."""
    t0 = time.perf_counter()
    procs = []
    for i, cmd in enumerate(cmds):
        log.info("$ %s", " ".join(cmd))
        out = (log_dir / f"{cmd[0]}-{int(time.time())}-{i}.log").open("w")
        procs.append((cmd, subprocess.Popen([sys.executable, "-m", *cmd], stdout=out, stderr=subprocess.STDOUT),
                      out))
    walls: list[float | None] = [None] * len(procs)
    while any(w is None for w in walls):  # poll: each command's own wall time
        for i, (cmd, proc, out) in enumerate(procs):
            if walls[i] is None and proc.poll() is not None:
                walls[i] = time.perf_counter() - t0
                out.close()
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {out.name}")
        time.sleep(1.0)
    return [float(w) for w in walls if w is not None]


def curve(client: Any, experiment: str, search_run: Any, metric: str, mode: str) -> dict[str, Any]:
    """Per trial (start order) the final validation objective, and the best so far."""
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{search_run.info.run_id}'",
                                max_results=1000)
    trials.sort(key=lambda r: (r.info.start_time or 0, r.info.run_name))  # start order (Tune's ids are random)
    values = [r.data.metrics.get(metric) for r in trials]
    best: list[float | None] = []
    current = None
    for v in values:
        if v is not None and (current is None or (v < current if mode == "min" else v > current)):
            current = v
        best.append(current)
    first = trials[0].data.params if trials else {}
    return {"search": search_run.data.tags["calotune.search"], "state": search_run.data.tags.get("calotune.state"),
            "values": values, "best_so_far": best,
            "first_trial_params": first, "best_test": search_run.data.metrics.get(f"best_test_{metric}"),
            "default_test": search_run.data.metrics.get(f"default_test_{metric}"),
            "warm_start_from": search_run.data.tags.get("calotune.warm_start_from")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="zdc_swiglu")
    p.add_argument("--model", default="zdc", help="registered model name of the space's detector geometry")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-seed", type=int, default=10)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    p.add_argument("--sequential", action="store_true", help="run the warm and the cold search one after the other")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: read the latest finished warm and cold searches of the store")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mlflow.tracking import MlflowClient

    home = str(args.home)
    args.home.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.home.resolve() / 'mlflow.db'}"
    walls: dict[str, float] = {}

    def has_alias(alias: str) -> bool:
        """Whether the store exists and the model has a version under ``alias``."""
        if not (args.home / "mlflow.db").exists():
            return False
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            client.get_model_version_by_alias(args.model, alias)
            return True
        except Exception:
            return False

    logs = args.home / "logs"
    logs.mkdir(exist_ok=True)
    if args.report_only:
        pass
    elif not has_alias("production"):
        if not has_alias("candidate"):
            walls["reference"] = run(["calotune.search", args.space, "--seed", str(args.reference_seed),
                                      "--home", home], log_dir=logs)[0]
        run(["calotune.promote", args.model, "--home", home], log_dir=logs)
    warm = ["calotune.search", args.space, "--seed", str(args.seed), "--home", home,
            "--warm-start", f"models:/{args.model}@production"]
    cold = ["calotune.search", args.space, "--seed", str(args.seed), "--home", home]
    if args.report_only:
        pass
    elif args.sequential:
        walls["warm"], walls["cold"] = run(warm, log_dir=logs)[0], run(cold, log_dir=logs)[0]
    else:
        walls["warm"], walls["cold"] = run(warm, cold, log_dir=logs)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    from calotune.spec import load_spec

    spec = load_spec(args.space)
    metric, mode = spec.objective.metric, spec.objective.mode
    exp = client.get_experiment_by_name(spec.name).experiment_id
    # --report-only also reads searches still running (a partial curve, marked by its state)
    state = "" if args.report_only else " and tags.`calotune.state` = 'finished'"
    searches = client.search_runs([exp], f"tags.`calotune.kind` = 'search'{state}",
                                  order_by=["attributes.start_time DESC"], max_results=2)
    warm_run = next(r for r in searches if "calotune.warm_start_from" in r.data.tags)
    cold_run = next(r for r in searches if "calotune.warm_start_from" not in r.data.tags)
    production_version = client.get_model_version_by_alias(args.model, "production")
    result = {"space": args.space, "metric": metric, "mode": mode, "seed": args.seed, "wall_s": walls,
              "production": f"{args.model}/{production_version.version}",
              "production_params": client.get_run(production_version.run_id).data.params,
              "warm": curve(client, exp, warm_run, metric, mode),
              "cold": curve(client, exp, cold_run, metric, mode)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    log.info("warm: best validation %s, held-out %s; cold: best validation %s, held-out %s",
             result["warm"]["best_so_far"][-1], result["warm"]["best_test"],
             result["cold"]["best_so_far"][-1], result["cold"]["best_test"])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, color in (("cold", "tab:gray"), ("warm", "tab:green")):
            ys = result[arm]["best_so_far"]
            ax.step(range(1, len(ys) + 1), [y if y is not None else float("nan") for y in ys], where="post",
                    color=color, label=f"{arm} (held-out best {result[arm]['best_test'] or math.nan:.4f})")
            ax.plot(range(1, len(ys) + 1), [v if v is not None else float("nan") for v in result[arm]["values"]],
                    "o", color=color, alpha=0.4, ms=4)
        ax.set_xlabel("trial (start order)")
        ax.set_ylabel(f"validation {metric} ({mode}), best so far")
        ax.set_title(f"{args.space}: warm start from {result['production']} vs cold, seed {args.seed}")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
