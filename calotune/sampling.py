"""Generate showers from a model for given conditions, in batches, timed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from calotune.models.base import GenerativeModel
from calotune.showers import ShowerSet


def generate_batches(
    model: GenerativeModel,
    condition_batches: Iterable[dict[str, np.ndarray]],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
) -> Iterator[tuple[ShowerSet, float]]:
    """Showers for each batch of conditions, one batch at a time, with the batch's sampling time (s).

    One generator runs through all batches, so the showers are the same whether the
    caller keeps them (:func:`generate`) or streams them to disk batch by batch and
    holds one batch in memory (``python -m calotune.generate``). ``sample_kwargs`` are the
    family's cost knobs (the trainer's cheaper validation); None samples at full cost.
    """
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for conditions in condition_batches:
        batch = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in conditions.items()}
        t0 = time.perf_counter()
        out = model.sample(batch, generator=gen, **(sample_kwargs or {}))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        cells = {name: c.float().cpu().numpy().astype(np.float32, copy=False) for name, c in out.items()}
        yield (
            ShowerSet(conditions={k: np.asarray(v, dtype=np.float32) for k, v in conditions.items()}, cells=cells),
            elapsed,
        )


def generate(
    model: GenerativeModel,
    conditions: dict[str, np.ndarray],
    *,
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
) -> tuple[ShowerSet, float]:
    """Showers for each condition row, and the wall time per shower in milliseconds.

    The time covers the model's ``sample`` calls only (batch size as given), which is the
    figure the CaloChallenge reports as generation time per shower.
    """
    n = len(conditions["energy"])
    batches = (
        {k: v[start : start + batch_size] for k, v in conditions.items()} for start in range(0, n, batch_size)
    )
    parts: dict[str, list[np.ndarray]] = {}
    elapsed = 0.0
    for showers, seconds in generate_batches(model, batches, seed=seed, device=device,
                                                  sample_kwargs=sample_kwargs):
        elapsed += seconds
        for name, cells in showers.cells.items():
            parts.setdefault(name, []).append(cells)
    cells = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    showers = ShowerSet(
        conditions={k: np.asarray(v, dtype=np.float32) for k, v in conditions.items()}, cells=cells
    )
    return showers, 1e3 * elapsed / max(n, 1)


def score_model(model_dir, reference: ShowerSet, seed: int = 0) -> tuple[dict[str, float], ShowerSet]:
    """Generate for ``reference``'s conditions and score against it (plus gen_time_ms).

    The one place where "how good is this saved model on this sample" is computed, so the
    search summary and promotion compare models the same way.
    """
    from calotune.artifacts import load_model

    model, detector, _ = load_model(model_dir)
    generated, ms = generate(model, reference.conditions, seed=seed)
    scores = detector.scores(reference, generated)
    scores["gen_time_ms"] = ms
    return scores, generated
