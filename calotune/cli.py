"""Shared command-line plumbing: logging set-up and the UserError -> exit 2 contract."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from calotune.errors import UserError


def configure_logging(verbose: bool = False) -> None:
    """calotune logs at INFO to stderr; third-party chatter is kept at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "optuna", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:  # MLflow (re)configures its loggers on import, from this variable
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run_cli(body: Callable[[], int]) -> int:
    """Run a command body; a UserError becomes one line on stderr and exit status 2."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: ``finally`` blocks run, so no temporary or lock is left behind."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cli_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None) -> int:
    """The one entry wrapper of every calotune command: parse, set up logging, run ``body``
    with UserError -> one line and exit 2, Ctrl-C or SIGTERM -> exit 130."""
    args = parser.parse_args(argv)
    configure_logging(bool(getattr(args, "verbose", False)))
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)
    return run_cli(lambda: body(args))
