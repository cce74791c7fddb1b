"""Generation time per shower at a stated batch size.

The CaloChallenge 2022 community paper (arXiv 2410.21611) compares models by time per
shower at fixed batch sizes (1 to 10^4 on CPU and GPU); the number means nothing without
its batch size and device, so both travel with it. Warm-up batches are excluded because
the first calls pay for lazy initialisation (allocator, kernel selection, JIT), which a
production simulation pays once.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TimingResult", "generation_time"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingResult:
    """Wall-clock generation speed.

    per_shower_s: total timed seconds / timed showers (the challenge's number).
    median_batch_s: median seconds of one batch, robust to a stray slow batch.
    """

    per_shower_s: float
    median_batch_s: float
    batch_size: int
    n_batches: int
    n_showers: int
    total_s: float
    warmup_batches: int
    device: str

    @property
    def per_shower_ms(self) -> float:
        return 1e3 * self.per_shower_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_shower_ms"] = self.per_shower_ms
        return d


def generation_time(
    generate: Callable[[int], object],
    *,
    batch_size: int,
    n_batches: int = 5,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
    device: str = "cpu",
) -> TimingResult:
    """Time ``generate(batch_size)`` calls.

    Args:
        generate: produces one batch of ``batch_size`` showers (its output is discarded).
        batch_size: showers per call, reported with the result.
        n_batches: timed calls.
        warmup: untimed calls first.
        synchronize: called after each batch before the clock is read; pass
            ``torch.cuda.synchronize`` for GPU generators, whose calls return before the
            kernels finish.
        device: free-text device label reported with the result ("cpu", "H100", ...).
    """
    if batch_size < 1 or n_batches < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, n_batches >= 1, warmup >= 0; got "
                         f"({batch_size}, {n_batches}, {warmup})")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        generate(batch_size)
        sync()
    times = []
    for _ in range(n_batches):
        start = time.perf_counter()
        generate(batch_size)
        sync()
        times.append(time.perf_counter() - start)
    total = sum(times)
    result = TimingResult(
        per_shower_s=total / (batch_size * n_batches),
        median_batch_s=statistics.median(times),
        batch_size=batch_size,
        n_batches=n_batches,
        n_showers=batch_size * n_batches,
        total_s=total,
        warmup_batches=warmup,
        device=device,
    )
    logger.debug("generation time: %.4g ms per shower at batch %d on %s",
                 result.per_shower_ms, batch_size, device)
    return result
