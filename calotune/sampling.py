"""Generate showers from a model for given conditions, in batches, timed; and score them.

:func:`score_model` generates the whole sample and scores it; :func:`score_model_streamed`
(what the search's test scores and promotion use) reduces each generated batch to the
detector's per-event :class:`~calotune.detectors.base.Summary` at once, so it never holds
the generated sample, and takes the reference's summary, computed once, for every model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from calotune.models.base import POINTS_OUTPUT, GenerativeModel
from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.detectors.base import Detector, Summary
    from calotune.pointclouds import PointCloudSet

log = logging.getLogger("calotune.sampling")

#: Events generated, summarised and dropped at a time by :func:`score_streamed`: the batch
#: size :func:`generate` samples with, so the showers (and the scores) are the same.
SCORE_CHUNK_EVENTS = 1000

#: A generated sample: cells on a grid, or hits of a point cloud.
Sample = Union[ShowerSet, "PointCloudSet"]


def as_sample(conditions: dict[str, np.ndarray], out: dict[str, torch.Tensor]) -> Sample:
    """A family's ``sample`` output as a ShowerSet (part -> cells) or, for point-cloud
    output (``{"hits", "offsets"}``), a PointCloudSet; refused if the output is neither."""
    conditions = {k: np.asarray(v, dtype=np.float32) for k, v in conditions.items()}
    if set(out) == set(POINTS_OUTPUT):
        from calotune.pointclouds import PointCloudSet

        hits = out["hits"].detach().float().cpu().numpy().astype(np.float32, copy=False)
        offsets = out["offsets"].detach().cpu().numpy().astype(np.int64, copy=False)
        return PointCloudSet(conditions=conditions, hits=hits.reshape(-1, 4), offsets=offsets)
    cells = {name: c.detach().float().cpu().numpy().astype(np.float32, copy=False) for name, c in out.items()}
    return ShowerSet(conditions=conditions, cells=cells)


def concat_samples(pieces: list[Sample]) -> Sample:
    """Batches of one generation run, back to back (grid or point-cloud)."""
    from calotune.pointclouds import PointCloudSet

    first = pieces[0]
    conditions = {k: np.concatenate([p.conditions[k] for p in pieces]) for k in first.conditions}
    if isinstance(first, PointCloudSet):
        ends = np.cumsum([0] + [len(p.hits) for p in pieces])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(pieces, ends, strict=False)])
        return PointCloudSet(conditions=conditions, hits=np.concatenate([p.hits for p in pieces]),
                             offsets=offsets.astype(np.int64))
    return ShowerSet(conditions=conditions,
                     cells={k: np.concatenate([p.cells[k] for p in pieces]) for k in first.cells})


def generate_batches(
    model: GenerativeModel,
    condition_batches: Iterable[dict[str, np.ndarray]],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
) -> Iterator[tuple[Sample, float]]:
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
        yield as_sample(conditions, out), elapsed


def generate(
    model: GenerativeModel,
    conditions: dict[str, np.ndarray],
    *,
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
) -> tuple[Sample, float]:
    """Showers for each condition row, and the wall time per shower in milliseconds.

    The time covers the model's ``sample`` calls only (batch size as given), which is the
    figure the CaloChallenge reports as generation time per shower.
    """
    n = len(conditions["energy"])
    batches = (
        {k: v[start : start + batch_size] for k, v in conditions.items()} for start in range(0, n, batch_size)
    )
    pieces: list[Sample] = []
    elapsed = 0.0
    for showers, seconds in generate_batches(model, batches, seed=seed, device=device,
                                                  sample_kwargs=sample_kwargs):
        elapsed += seconds
        pieces.append(showers)
    if not pieces:
        return ShowerSet(conditions={k: np.asarray(v, np.float32) for k, v in conditions.items()},
                         cells={}), 0.0
    return concat_samples(pieces), 1e3 * elapsed / max(n, 1)


def score_model(model_dir, reference: Sample, seed: int = 0) -> tuple[dict[str, float], Sample]:
    """Generate for ``reference``'s conditions and score against it (plus gen_time_ms).

    Holds the whole generated sample (returned, for plots or files). The search summary
    and promotion use :func:`score_model_streamed`, which gives the same scores without
    holding it; both score through ``detector.scores``, so models are compared the same way.
    """
    from calotune.artifacts import load_model

    model, detector, _ = load_model(model_dir)
    generated, ms = generate(model, reference.conditions, seed=seed)
    scores = detector.scores(reference, generated)
    scores["gen_time_ms"] = ms
    return scores, generated


def score_streamed(
    model: GenerativeModel,
    detector: Detector,
    reference: Sample,
    *,
    seed: int = 0,
    chunk_events: int = SCORE_CHUNK_EVENTS,
    reference_summary: Summary | None = None,
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, float], Summary]:
    """Scores of ``model`` on ``reference``'s conditions, generated and summarised
    ``chunk_events`` at a time, and the generated sample's summary (for plots).

    The showers are those of ``generate(model, reference.conditions, batch_size=chunk_events,
    seed=seed)`` (one generator through all batches), each reduced to
    ``detector.summarise`` before the next is made: memory holds one batch of cells and
    the per-event summaries, not the generated sample, and the scores are those of
    ``detector.scores(reference, generated)`` on that sample (``tests/test_streamed_scoring.py``).
    ``reference_summary`` (``detector.summarise(reference)``) lets several models share one;
    one made by another geometry is not used (a warning, and the reference is summarised
    again). ``gen_time_ms`` is added with :func:`generate`'s meaning: sampling time per
    shower at this batch size. The returned summary has its cell-sized score inputs
    dropped (:meth:`~calotune.detectors.base.Summary.for_plots`).

    Raises:
        ValueError: for an empty reference or ``chunk_events`` < 1.
    """
    from calotune.detectors.base import SummaryBuilder

    n = len(reference)
    if n == 0:
        raise ValueError("score_streamed needs a non-empty reference sample")
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be at least 1, got {chunk_events}")
    if reference_summary is not None and reference_summary.meta.get("detector") != detector.summary_key:
        log.warning("the reference summary was made by another detector geometry than the model's "
                    "(%s); summarising the reference again", detector.name)
        reference_summary = None
    if reference_summary is None:
        reference_summary = detector.summarise(reference)
    conditions = reference.conditions
    batches = ({k: v[lo : lo + chunk_events] for k, v in conditions.items()} for lo in range(0, n, chunk_events))
    builder = SummaryBuilder(n)
    elapsed = 0.0
    for showers, seconds in generate_batches(model, batches, seed=seed, device=device, sample_kwargs=sample_kwargs):
        elapsed += seconds
        builder.add(detector.summarise(showers))
        del showers  # the batch's cells go before the next batch is sampled
    generated = builder.result()
    scores = detector.scores_from(reference_summary, generated)
    scores["gen_time_ms"] = 1e3 * elapsed / n
    return scores, generated.for_plots()


def score_model_streamed(
    model_dir,
    reference: Sample,
    seed: int = 0,
    *,
    chunk_events: int = SCORE_CHUNK_EVENTS,
    reference_summary: Summary | None = None,
) -> tuple[dict[str, float], Summary]:
    """:func:`score_model` streamed (:func:`score_streamed`): the same scores for the default
    ``chunk_events`` (the batch size :func:`generate` uses), the generated sample's summary
    instead of the sample. Pass ``reference_summary`` (``detector.summarise(reference)``)
    to score several models against one reference without summarising it again."""
    from calotune.artifacts import load_model

    model, detector, _ = load_model(model_dir)
    return score_streamed(model, detector, reference, seed=seed, chunk_events=chunk_events,
                          reference_summary=reference_summary)
