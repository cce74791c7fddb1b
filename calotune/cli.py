"""Shared command-line plumbing: logging set-up and the UserError -> exit 2 contract."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

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


def exit_now(code: int | None) -> NoReturn:
    """End a command's process as the interpreter would, without its module teardown.

    After ``main`` returns, Python's finalisation garbage-collects the ~4,400 modules that
    torch, Ray, MLflow and pandas load, one by one: 1.5-1.9 s after a search has already
    printed its summary (``Py_FinalizeEx`` -> ``finalize_modules`` -> ``gc``, seen with gdb
    on a tiny search). Nothing a command writes depends on it: every file calotune writes
    is closed or flushed when written, and the MLflow queue is flushed before the summary.
    So this does what the interpreter's exit does before the teardown, in its order
    (non-daemon threads joined and ``threading``'s own exit hooks, then the ``atexit``
    handlers, then logging and stdio flushed) and leaves with ``os._exit``.

    Only for ``if __name__ == "__main__"``: called in-process it would end the caller too.
    """
    code = 0 if code is None else int(code)
    try:
        shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(code)
