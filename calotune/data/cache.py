"""Synthetic reference samples built once and shared by every trial that needs them.

A search runs many trials on the same reference sample; regenerating it per trial wastes
seconds each time and, worse, risks trials comparing against different samples. The file
name carries everything the sample depends on, so a changed geometry, seed, size, option
or parametrisation version gets a new file instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from calotune.data.hdf5 import available_memory, check_free_space
from calotune.detectors.base import Detector
from calotune.errors import UserError

log = logging.getLogger(__name__)


def _digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (sorted keys: dict order must not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cache_name(detector: Detector, n_events: int, seed: int, **options: Any) -> str:
    """File name for a synthetic sample, e.g. ``zdc-g1a2b3c4d5e-n1000-s7-particle=photon-o....h5``.

    Readable parts for humans, a geometry hash and an options hash (which also covers the
    detector's ``synthesis_version``) for uniqueness.
    """
    geometry = _digest(detector.geometry_dict())
    version = getattr(detector, "synthesis_version", 0)
    readable = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    readable = re.sub(r"[^A-Za-z0-9_.=-]", "_", readable)[:80]
    opts = _digest({"options": options, "version": version})
    return f"{detector.name}-g{geometry}-n{n_events}-s{seed}{readable}-o{opts}.h5"


#: synthesis holds every event in memory, plus temporaries and the checks before writing.
SYNTH_MEMORY_FACTOR = 2


def synth_limits(detector: Detector, n_events: int, out: Path, flag: str = "--events") -> None:
    """Refuse a synthetic sample that cannot fit in memory or on disk, giving the limit.

    A detector's synthesis draws all events from one random stream (so a seed names
    one sample), which is why it cannot be streamed in independent chunks; the honest
    alternative to an OOM kill an hour later is to say up front how many events fit.
    """
    row_bytes = 4 * (len(detector.conditions) + sum(detector.part_sizes.values()))
    need = n_events * row_bytes * SYNTH_MEMORY_FACTOR
    free = available_memory()
    if need > free:
        most = free // (row_bytes * SYNTH_MEMORY_FACTOR)
        raise UserError(
            f"{flag} {n_events}: {detector.name} synthesis holds every event in memory, about "
            f"{need / 2**30:,.2f} GiB, but only {free / 2**30:,.2f} GiB is available; at most {most} events "
            "fit; write several files with different --seed"
        )
    check_free_space(out, n_events * row_bytes + (1 << 20), f"{flag} {n_events}",
                     "lower --events or choose --out on a larger disk")


def cached_synthetic(detector: Detector, n_events: int, seed: int, cache_dir: Path, **options: Any) -> Path:
    """Path of ``detector.synthesize(n_events, seed, **options)`` written under ``cache_dir``.

    Built on first use and re-used afterwards. The detector's ``write`` is atomic, so two
    workers racing on the same name both end with a complete file (the last rename wins,
    and both wrote the same deterministic sample).
    """
    path = Path(cache_dir) / cache_name(detector, n_events, seed, **options)
    if path.exists():
        log.debug("re-using cached synthetic sample %s", path)
        return path
    synth_limits(detector, n_events, path, flag="synthetic events")
    start = time.perf_counter()
    showers = detector.synthesize(n_events, seed, **options)
    detector.write(path, showers)
    log.info("built synthetic %s sample %s in %.1f s", detector.name, path, time.perf_counter() - start)
    return path
