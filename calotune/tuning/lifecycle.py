"""A search's life outside the training loop: its name, its lock, its resume, its interrupt.

These are the parts of a search that decide whether the record in MLflow tells the truth
when a user (or a batch system) stops, restarts or doubles a search:

- **Names.** A search is named ``<space>-<UTC time>-<random>``; two searches of one space
  started in the same second get different names, so their MLflow runs never merge.
- **Lock.** A running search holds an exclusive OS lock on ``<home>/searches/<name>.lock``
  (``fcntl.flock``): a second ``--resume`` of a search that is still running is refused
  instead of driving the same Ray Tune experiment twice. The kernel drops the lock when
  the holder dies, even by SIGKILL, so a stale lock cannot exist.
- **Resume.** The budget a search started with (trials, epochs, seed, data, resources,
  space) is recorded as parameters of its MLflow parent run; a resume takes them from
  there and refuses flags that contradict them, so a resumed search never mixes budgets.
- **Interrupt.** SIGINT (Ctrl-C) and SIGTERM (``kill``, ``scancel``, a batch time limit)
  set :data:`STOP`; Ray Tune is asked to stop gracefully (it snapshots its experiment
  state one last time), the search records its running trials as interrupted, registers
  nothing and exits 130. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: Set once the driver received SIGINT or SIGTERM; callbacks and the searcher read it to
#: record trials that end after it as interrupted, never as failed or complete.
STOP = threading.Event()
#: Set once Ray Tune's own graceful stop has been triggered for :data:`STOP`.
_FORWARDED = threading.Event()
#: Exit status of an interrupted command (128 + SIGINT), what shells report for Ctrl-C.
EXIT_INTERRUPTED = 130
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[str] = []


def new_search_name(space: str) -> str:
    """``<space>-<YYYYmmdd-HHMMSS>-<4 hex>``: sortable by start, unique under concurrency."""
    return f"{space}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def check_search_name(name: str, flag: str = "--resume") -> str:
    """A search name that is safe as a file name (it names lock and state files)."""
    if not _NAME.match(name) or ".." in name:
        raise UserError(f"{flag} {name!r}: not a search name; names look like "
                        f"zdc_swiglu-20261202-073303-a1b2 (letters, digits, '_', '.', '-')")
    return name


def searches_dir(home: Path) -> Path:
    return home / "searches"


def latest_search(home: Path, space: str) -> str | None:
    """The name of the search of ``space`` most recently started under ``home``."""
    path = searches_dir(home) / f"{space}.latest"
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def record_latest(home: Path, space: str, name: str) -> None:
    """Remember ``name`` as the latest search of ``space`` (atomic: never half a name)."""
    folder = searches_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{space}.latest.{os.getpid()}.{secrets.token_hex(3)}"
    tmp.write_text(name)
    os.replace(tmp, folder / f"{space}.latest")


@contextlib.contextmanager
def search_lock(home: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock of search ``name`` for the duration of the block.

    UserError (exit 2) naming the holder when another live process holds it. The lock file
    stays (it holds the last holder's identity); the lock itself is the kernel's.
    """
    folder = searches_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"search {name!r} is running right now ({holder}); wait for it to end or stop it "
                f"(Ctrl-C), then resume it with --resume {name}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# --- resume ----------------------------------------------------------------------------
def budget_record(*, space_hash: str, trials: int, max_epochs: int, seed: int, data: str,
                  data_hash: str, resources: dict[str, Any], sampler: str = "tpe",
                  scheduler: str = "asha") -> dict[str, str]:
    """The parameters a search is started with and must be resumed with, as MLflow params."""
    record = {"space_hash": space_hash, "trials": trials, "max_epochs": max_epochs, "seed": seed,
              "data": data, "data_hash": data_hash, "sampler": sampler, "scheduler": scheduler,
              **{f"resources.{k}": v for k, v in sorted(resources.items())}}
    return {k: str(v) for k, v in record.items()}


#: Parameter -> the flag that sets it, for messages.
_FLAGS = {"trials": "--trials", "max_epochs": "--max-epochs", "seed": "--seed",
          "sampler": "--sampler", "scheduler": "--scheduler", "warm_start": "--warm-start",
          "resources.cpus_per_trial": "--cpus-per-trial", "resources.gpus_per_trial": "--gpus-per-trial",
          "resources.workers_per_trial": "--workers-per-trial",
          "resources.max_concurrent_trials": "--max-concurrent"}


def _same(recorded: str, given: Any) -> bool:
    with contextlib.suppress(ValueError):
        return float(recorded) == float(given)
    return recorded == str(given)


def check_resume_flags(name: str, recorded: dict[str, str], given: dict[str, Any]) -> None:
    """Refuse flags that contradict the budget search ``name`` was started with.

    ``given`` holds only the flags the user passed (parameter name -> value).
    """
    for key, value in given.items():
        if key in recorded and not _same(recorded[key], value):
            raise UserError(
                f"{_FLAGS.get(key, key)} {value}: search {name!r} was started with "
                f"{recorded[key]}; a resumed search keeps its budget, so drop the flag (or pass "
                f"{recorded[key]}), or start a new search without --resume"
            )


# --- interrupts ------------------------------------------------------------------------
def _forward_to_tune(frame: Any = None) -> bool:
    """Trigger Ray Tune's own graceful stop (its SIGUSR1 handler) if it is installed."""
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler) and getattr(handler, "__module__", "").startswith("ray."):
        handler(signal.SIGUSR1, frame)
        return True
    return False


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if STOP.is_set():  # the second signal: stop now, whatever is running
        raise KeyboardInterrupt(name)
    STOP.set()
    _received.append(name)
    log.warning("%s received: stopping the search; running trials are recorded as interrupted and "
                "nothing is registered (send it again to stop at once)", name)
    if _forward_to_tune(frame):
        _FORWARDED.set()


def received_signal() -> str:
    """The name of the signal that stopped the search ("SIGINT"), or "" if none."""
    return _received[0] if _received else ""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Route SIGINT and SIGTERM to a graceful stop while the block runs.

    Installed after ``ray.init``: Ray's core worker replaces SIGTERM's handler with one that
    aborts the process, which would leave every run RUNNING and nothing resumable. Tune's
    own SIGINT handler is disabled (``TUNE_DISABLE_SIGINT_HANDLER``) so that SIGINT and
    SIGTERM take one path; Tune's SIGUSR1 handler, installed inside ``fit``, is what is
    finally called to stop it.
    """
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: a handler set outside Python (Ray's)
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _sigaction() -> Any:
    """libc's ``sigaction``, or None where it cannot be reached (then nothing is restored)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).sigaction
    except (OSError, AttributeError):
        return None


def shutdown_ray_keeping_handlers() -> None:
    """``ray.shutdown()`` without losing the driver's SIGINT/SIGTERM handlers.

    Ray's shutdown resets the process's SIGTERM disposition to the default at the C level
    (Python's ``signal.getsignal`` still names our handler), so a ``kill`` arriving after
    it would end the driver with status -15 in the middle of scoring or registering,
    leaving the search RUNNING. The dispositions are saved before and put back after, as
    opaque ``struct sigaction`` buffers: this works from the thread the shutdown runs on,
    where ``signal.signal`` may not be called.
    """
    import ctypes

    import ray

    sigaction = _sigaction()
    saved: dict[int, Any] = {}
    if sigaction is not None:
        for s in _SIGNALS:
            buf = ctypes.create_string_buffer(1024)  # larger than any platform's struct sigaction
            if sigaction(int(s), None, buf) == 0:
                saved[int(s)] = buf
    try:
        ray.shutdown()
    finally:
        for s, buf in saved.items():
            if sigaction(s, buf, None) != 0:
                log.debug("could not restore the handler of signal %d", s)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a short record-keeping step runs.

    Registering a model version and moving its alias are two MLflow calls; a signal
    between them would leave a version without its alias. The signals are delivered (and
    act) when the block ends.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class InterruptCallback(Callback):
    """Forward a stop that arrived before Tune installed its handler, at the next step."""

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if STOP.is_set() and not _FORWARDED.is_set() and _forward_to_tune():
            _FORWARDED.set()
