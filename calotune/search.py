"""``python -m calotune.search SPACE``: run (or resume) a hyperparameter search.

A thin command line over :mod:`calotune.tuning.orchestrate`: flags become a
:class:`~calotune.tuning.orchestrate.SearchRequest`; everything the user can get wrong is
checked there before anything is written, so bad input leaves no half-made MLflow runs or
result folders behind: one message, exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from calotune.cli import cli_main
from calotune.tuning.orchestrate import LATEST, SearchRequest, search


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calotune.search",
        description="Hyperparameter search over a calorimeter generative model "
                    "(Ray Tune + Optuna TPE + ASHA, tracked in MLflow).",
    )
    p.add_argument("space", help="search-space name in search_spaces/ (e.g. zdc_swiglu) or a YAML path")
    p.add_argument("--trials", type=int, help="number of trials (default: the space's budget.trials)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: budget.max_epochs)")
    p.add_argument("--data", type=Path, help="reference HDF5 file (default: built-in synthetic data)")
    p.add_argument("--events", type=int, help="synthetic events to generate when --data is absent")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--storage-path", help="Ray Tune results folder (default: ./.calotune/ray_results); "
                   "shared storage for multi-node clusters")
    p.add_argument("--address", help="existing Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--seed", type=int, help="seed of the sampler, data split and training (default 0)")
    p.add_argument("--resume", nargs="?", const=LATEST, metavar="SEARCH",
                   help="resume an interrupted search: the latest of SPACE, or the named one; its "
                        "budget, seed and data are taken from its record")
    p.add_argument("--cpus-per-trial", type=float, help="override resources.cpus_per_trial")
    p.add_argument("--gpus-per-trial", type=float, help="override resources.gpus_per_trial")
    p.add_argument("--workers-per-trial", type=int, help="override resources.workers_per_trial (DDP)")
    p.add_argument("--max-concurrent", type=int, help="override resources.max_concurrent_trials")
    p.add_argument("--sampler", help="override the space's sampler: random, tpe, cmaes, gp, qmc, nsga2, nsga3")
    p.add_argument("--scheduler", help="override the space's scheduler: none, asha, moasha (several "
                                       "objectives), hyperband, median, pbt (population-based training; "
                                       "needs scheduler.mutate in the space)")
    p.add_argument("--warm-start", nargs="?", const="auto", metavar="SOURCE",
                   help="seed the search with earlier results: bare (or 'auto'): the detector's production "
                        "model (the first trial) and the finished searches of the same family in the "
                        "tracking store; or a search name, or models:/NAME@ALIAS|/VERSION (comma-separated "
                        "for several); recorded as tag calotune.warm_start_from")
    p.add_argument("--home", type=Path, default=Path(".calotune"),
                   help="project-local folder for the data cache, MLflow store and results")
    p.add_argument("--study-storage", metavar="URI",
                   help="database of the search's Optuna study, for optuna-dashboard (default: SQLite "
                        "optuna.db next to the MLflow store; a team: postgresql://USER@HOST/optuna)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="batch mode: one line per finished trial, no progress bar (also: "
                        "CALOTUNE_PROGRESS=quiet); without a terminal there is no bar anyway")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        fields = {k: v for k, v in vars(args).items() if k not in {"verbose", "quiet"}}
        if args.quiet:  # read by the progress view, also by one Ray Tune restores on --resume
            os.environ["CALOTUNE_PROGRESS"] = "quiet"  # runner.PROGRESS_ENV (importing it loads Ray)
        return search(SearchRequest(**fields))

    return cli_main(build_parser(), body, argv)


if __name__ == "__main__":
    from calotune.cli import exit_now

    exit_now(main())  # without the interpreter's module teardown (calotune.cli.exit_now)
