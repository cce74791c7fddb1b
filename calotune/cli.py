"""Shared command-line plumbing: logging set-up and the UserError -> exit 2 contract."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

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
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run_cli(body: Callable[[], int]) -> int:
    """Run a command body; a UserError becomes one line on stderr and exit status 2."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
