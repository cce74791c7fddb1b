"""Streamed scoring: a sample summarised batch by batch scores and plots as the whole sample.

``calotune.sampling.score_streamed`` (the search's held-out scores, promotion) never holds
a generated sample: each batch is reduced to the detector's per-event ``Summary`` and the
summaries are concatenated. Every registered detector must give the same summary arrays,
the same scores (same seed; tolerance only for float summation order) and the same plot
files that way as from the whole sample, for chunk sizes that do and do not divide it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from calotune.artifacts import save_model
from calotune.detectors import detector_names, get_detector
from calotune.detectors.base import Detector, Summary, SummaryBuilder
from calotune.models.registry import build_model
from calotune.pointclouds import PointCloudSet
from calotune.sampling import generate, score_model, score_model_streamed, score_streamed
from calotune.showers import ShowerSet

#: events per synthetic sample; the CaloChallenge ones train a classifier per score, on 2 cores.
EVENTS: dict[str, int] = {
    "calochallenge-1-photons": 60,
    "calochallenge-1-pions": 60,
    "calochallenge-2": 40,
    "calochallenge-3": 30,
}
CASES = detector_names()


def _one_per_package() -> list[str]:
    """The smallest registered detector of each detector package: scores and plots run
    the package's code whatever the preset, and the large presets take seconds a score."""
    chosen: dict[str, tuple[int, str]] = {}
    for name in CASES:
        detector = get_detector(name)
        size = (sum(detector.part_sizes.values()), name)
        chosen[type(detector).__module__] = min(chosen.get(type(detector).__module__, size), size)
    return sorted(name for _, name in chosen.values())


PACKAGE_CASES = _one_per_package()
#: a chunk size that divides the sample, one that does not (the last chunk is short).
CHUNKS = {"divides": lambda n: next(c for c in range(n // 3, 0, -1) if n % c == 0),
          "remainder": lambda n: n // 3 + 1}
#: the shrunken ZDC and tiny generator of search_spaces/zdc_swiglu_tiny.yaml.
TINY_GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}
TINY_PARAMS = {"hidden_width": 16}


def _samples(name: str) -> tuple[Detector, ShowerSet | PointCloudSet, ShowerSet | PointCloudSet]:
    detector = get_detector(name)
    n = EVENTS.get(name, 120)
    return detector, detector.synthesize(n, seed=3), detector.synthesize(n, seed=4)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[Detector, ShowerSet | PointCloudSet, ShowerSet | PointCloudSet]:
    """Every registered detector (summaries only: cheap)."""
    return _samples(request.param)


@pytest.fixture(scope="module", params=PACKAGE_CASES)
def package_case(request: pytest.FixtureRequest) -> tuple[Detector, ShowerSet | PointCloudSet,
                                                          ShowerSet | PointCloudSet]:
    """One detector per package (scores and plots)."""
    return _samples(request.param)


def test_every_package_is_covered() -> None:
    assert {type(get_detector(n)).__module__ for n in PACKAGE_CASES} == {
        type(get_detector(n)).__module__ for n in CASES}
    assert len(PACKAGE_CASES) >= 5


def _streamed(detector: Detector, sample: ShowerSet | PointCloudSet, chunk: int) -> Summary:
    """The sample summarised ``chunk`` events at a time, as score_streamed does."""
    n = len(sample)
    builder = SummaryBuilder(n)
    for lo in range(0, n, chunk):
        builder.add(detector.summarise(sample.subset(slice(lo, min(n, lo + chunk)))))
    return builder.result()


def _same_scores(a: dict[str, float], b: dict[str, float]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("how", sorted(CHUNKS))
def test_batch_summaries_concatenate_to_the_whole(case, how: str) -> None:
    detector, _, generated = case
    chunk = CHUNKS[how](len(generated))
    assert (len(generated) % chunk == 0) == (how == "divides")
    whole, streamed = detector.summarise(generated), _streamed(detector, generated, chunk)
    assert len(streamed) == len(whole) == len(generated)
    assert streamed.meta == whole.meta and streamed.heavy == whole.heavy
    assert streamed.meta["detector"] == detector.summary_key
    for kind in ("events", "pooled"):
        mine, theirs = getattr(streamed, kind), getattr(whole, kind)
        assert set(mine) == set(theirs) and (kind == "pooled" or mine)
        for name in theirs:
            assert mine[name].dtype == theirs[name].dtype and mine[name].shape == theirs[name].shape, name
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
    # the list-of-pieces concatenation (total unknown) gives the same summary
    pieces = [detector.summarise(generated.subset(slice(lo, lo + chunk))) for lo in range(0, len(generated), chunk)]
    again = Summary.concat(pieces)
    for name, value in whole.events.items():
        np.testing.assert_allclose(again.events[name], value, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)


def test_streamed_scores_equal_whole_sample_scores(package_case) -> None:
    detector, reference, generated = package_case
    whole = detector.scores(reference, generated)
    assert set(detector.objectives()) <= set(whole)
    chunk = CHUNKS["remainder"](len(generated))
    # the reference's summary passed where a sample was (summarised once for every model)
    _same_scores(detector.scores(detector.summarise(reference), _streamed(detector, generated, chunk)), whole)


def test_streamed_plots_are_the_same_files(package_case, tmp_path: Path) -> None:
    detector, reference, generated = package_case
    whole = detector.plot(reference, generated, tmp_path / "whole")
    streamed = _streamed(detector, generated, CHUNKS["remainder"](len(generated))).for_plots()
    assert not streamed.heavy and not set(streamed.events) & detector.summarise(generated.subset(slice(0, 2))).heavy
    files = detector.plot(detector.summarise(reference), streamed, tmp_path / "streamed")
    assert files and sorted(p.name for p in files) == sorted(p.name for p in whole)
    assert all(p.stat().st_size > 0 for p in files)


def test_summary_of_another_geometry_is_refused() -> None:
    small, big = get_detector("zdc", **TINY_GEOMETRY), get_detector("zdc")
    summary = small.summarise(small.synthesize(20, seed=1))
    with pytest.raises(ValueError, match="another geometry"):
        big.scores(summary, summary)


def test_builder_checks_what_it_is_given() -> None:
    detector = get_detector("zdc", **TINY_GEOMETRY)
    sample = detector.synthesize(30, seed=1)
    builder = SummaryBuilder(40)
    builder.add(detector.summarise(sample))
    with pytest.raises(ValueError, match="30 events summarised, 40 announced"):
        builder.result()
    with pytest.raises(ValueError, match="more than the announced"):
        builder.add(detector.summarise(sample))
    full = get_detector("zdc")
    with pytest.raises(ValueError, match="meta"):
        Summary.concat([detector.summarise(sample), full.summarise(full.synthesize(5, seed=1))])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Detector, ShowerSet]:
    detector = get_detector("zdc", **TINY_GEOMETRY)
    torch.manual_seed(0)
    model = build_model("zdc_swiglu", TINY_PARAMS, detector)
    out = save_model(tmp_path_factory.mktemp("model") / "best", model, family="zdc_swiglu", detector=detector,
                     params=TINY_PARAMS)
    return out, detector, detector.synthesize(150, seed=5)


@pytest.mark.parametrize("chunk", [50, 64])
def test_score_streamed_equals_scoring_the_generated_sample(tiny_model, chunk: int) -> None:
    """Same model, seed and batch size: the streamed scores are those of the whole
    generated sample (150 events: chunks of 50 divide it, chunks of 64 do not)."""
    from calotune.artifacts import load_model

    model_dir, detector, reference = tiny_model
    model, _, _ = load_model(model_dir)
    generated, _ = generate(model, reference.conditions, batch_size=chunk, seed=7)
    expected = detector.scores(reference, generated)
    scores, summary = score_streamed(model, detector, reference, seed=7, chunk_events=chunk)
    ms = scores.pop("gen_time_ms")
    assert math.isfinite(ms) and ms > 0
    _same_scores(scores, expected)
    assert len(summary) == len(reference)
    np.testing.assert_allclose(summary.events["hcal_energy_scale"],
                               detector.summarise(generated).events["hcal_energy_scale"], rtol=1e-12)


def test_score_model_streamed_equals_score_model(tiny_model) -> None:
    """The default chunk is generate()'s batch size, so the promotion and search numbers
    do not move; one reference summary serves two models."""
    model_dir, detector, reference = tiny_model
    whole, generated = score_model(model_dir, reference, 3)
    ref_summary = detector.summarise(reference)
    streamed, summary = score_model_streamed(model_dir, reference, 3, reference_summary=ref_summary)
    whole.pop("gen_time_ms"), streamed.pop("gen_time_ms")
    _same_scores(streamed, whole)
    _same_scores(detector.scores(ref_summary, summary), whole)
    assert summary.nbytes < sum(v.nbytes for v in generated.cells.values())


def test_score_streamed_refuses_bad_chunks(tiny_model) -> None:
    from calotune.artifacts import load_model

    model_dir, detector, reference = tiny_model
    model, _, _ = load_model(model_dir)
    with pytest.raises(ValueError, match="chunk_events must be at least 1"):
        score_streamed(model, detector, reference, chunk_events=0)


def test_a_trials_streamed_validation_scores_what_scoring_the_whole_sample_gives(tmp_path: Path) -> None:
    """The worker's per-epoch validation (batches summarised as they are generated) reports
    the scores of the whole generated validation sample, for the model it kept."""
    from calotune.artifacts import load_model
    from calotune.data.splits import split, validation_subset
    from calotune.tuning.worker import BEST_DIR, TrialContext, train

    geometry = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}
    detector = get_detector("zdc", **geometry)
    data = split(detector.synthesize(300, seed=3), seed=0)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=geometry,
                       objectives=(("mean_separation", "min"),), max_epochs=1, seed=5,
                       fixed={"hidden_width": 16, "batch_size": 64}, validation_batch=7)
    reports: list[dict] = []

    def report(metrics: dict, checkpoint: Path | None) -> None:
        assert checkpoint is not None  # the last epoch always checkpoints
        import shutil

        shutil.copytree(checkpoint / BEST_DIR, tmp_path / "best")
        reports.append(dict(metrics))

    train(ctx, {}, data, report, device=torch.device("cpu"))
    model, _, _ = load_model(tmp_path / "best")
    reference = validation_subset(data.validation, ctx.validation_events, ctx.seed)
    generated, _ = generate(model, reference.conditions, batch_size=ctx.validation_batch, seed=ctx.seed + 0)
    whole = detector.scores(reference, generated)
    assert reports[0]["mean_separation_epoch"] == pytest.approx(whole["mean_separation"], rel=1e-9, abs=1e-12)
