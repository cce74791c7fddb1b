"""The model card every promotion decision writes: self-contained HTML (and a PDF) with
both models' scores on the same held-out data, sample sizes and floors, logged on the
candidate's run and linked from the registered version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from calotune import modelcard
from calotune.promote import main as promote_main
from tests.helpers import mlflow_client
from tests.test_registry import GEOMETRY, PARAMS, _register


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One untrained model (no training: the card's logic needs no good model) under two
    names, and its data file: the same weights score the same, so a second promotion of it
    is refused (the candidate must be strictly better)."""
    import torch

    from calotune.artifacts import save_model
    from calotune.detectors import get_detector
    from calotune.models.registry import build_model

    root = tmp_path_factory.mktemp("card-models")
    detector = get_detector("zdc", **GEOMETRY)
    data = root / "data.h5"
    detector.write(data, detector.synthesize(700, seed=5))
    torch.manual_seed(0)
    model = save_model(root / "model", build_model("zdc_swiglu", PARAMS, detector), family="zdc_swiglu",
                       detector=detector, params=PARAMS)
    return {"good": model, "bad": model, "data": data}


def _png(path: Path, colour: str) -> Path:
    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().plot([0, 1], [1, 0], color=colour)
    fig.savefig(path)
    return path


def _card(tmp_path: Path) -> modelcard.ModelCard:
    plots_c = {"zdc_total": _png(tmp_path / "c.png", "red")}
    plots_p = {"zdc_total": _png(tmp_path / "p.png", "blue")}
    return modelcard.ModelCard(
        model="zdc", detector="zdc", objective="mean_separation", mode="min", decision="not promoted",
        kind="refused", reason="Not promoted: <b>worse</b> than production.",
        candidate=modelcard.Side("candidate", "3", {"search": "s-1", "trial": "abc"},
                                 {"mean_separation": 0.31, "gen_time_ms": 0.2}, 120, plots_c),
        production=modelcard.Side("production", "2", {"search": "s-0"}, {"mean_separation": 0.25,
                                                                        "gen_time_ms": 0.4}, 120, plots_p),
        floor={"mean_separation": 0.05}, objectives={"mean_separation": "min", "gen_time_ms": "min"},
        reference_path="/data/ref.h5", reference_hash="0123456789abcdef", reference_split="test split",
        n_reference=120, floor_sizes=(60, 60), promoted_by="tester")


def test_card_is_self_contained_and_holds_every_number(tmp_path: Path) -> None:
    card = _card(tmp_path)
    html_path, pdf_path = modelcard.write_card(card, tmp_path / "out")
    html = html_path.read_text()
    assert html.count('src="data:image/png;base64,') == 2, "both models' plots, embedded"
    assert not re.search(r'src="(?!data:)', html), "no image may point outside the file"
    assert "/data/ref.h5" in html and "0123456789abcdef" in html and "half A (60 events)" in html
    for number in ("0.31", "0.25", "0.05", "0.2", "0.4", ">120<"):
        assert number in html, number
    assert "&lt;b&gt;worse&lt;/b&gt;" in html, "text from tags and messages is escaped"
    rows = {r["name"]: r for r in card.rows()}
    assert rows["mean_separation"]["better"] == "production" and rows["gen_time_ms"]["better"] == "candidate"
    assert next(iter(rows)) == "mean_separation", "the objective comes first"
    assert pdf_path.read_bytes().startswith(b"%PDF") and pdf_path.stat().st_size > 1000


def _version_card(home: Path, version: str) -> tuple[dict[str, str], str, str]:
    """(tags, description, HTML text) of a version's model card, read back from MLflow."""
    client = mlflow_client(home)
    mv = client.get_model_version("zdc", version)
    local = client.download_artifacts(mv.tags[modelcard.TAG_MODEL_CARD_RUN],
                                      mv.tags[modelcard.TAG_MODEL_CARD_PATH], str(home / f"dl-{version}"))
    return dict(mv.tags), mv.description or "", Path(local).read_text()


def test_promotion_and_refusal_each_log_a_card_linked_from_the_version(tmp_path: Path, models) -> None:
    home = tmp_path / "home"
    v = _register(home, models, "good")
    assert promote_main(["zdc", "--home", str(home)]) == 0
    tags, description, html = _version_card(home, v["good"])
    assert tags[modelcard.TAG_MODEL_CARD].endswith("/model_card/model_card.html")
    assert tags[modelcard.TAG_MODEL_CARD].startswith("file://")
    assert re.match(r"\[Model card\]\(#/experiments/\d+/runs/\w+/artifacts/model_card/model_card\.html\)",
                    description)
    assert "promoted" in html and "First promotion" in html and tags["candidate_score"][:4] in html
    assert html.count("data:image/png;base64,") >= 2, "the detector's physics plots, embedded"
    run = mlflow_client(home).get_run(tags[modelcard.TAG_MODEL_CARD_RUN])
    assert {"model_card/model_card.html", "model_card/model_card.pdf"} <= {
        f.path for f in mlflow_client(home).list_artifacts(run.info.run_id, "model_card")}
    parent = run.data.tags["mlflow.parentRunId"]
    assert mlflow_client(home).get_run(parent).data.tags[modelcard.TAG_MODEL_CARD] == tags[modelcard.TAG_MODEL_CARD]

    v.update(_register(home, models, "bad"))
    assert promote_main(["zdc", "--home", str(home)]) == 0
    prod = mlflow_client(home).get_registered_model("zdc").aliases["production"]
    assert str(prod) == v["good"], "a candidate that is not better is not promoted"
    tags, _, html = _version_card(home, v["bad"])
    assert "promotion" not in tags, "a refusal records no promotion"
    assert "not promoted" in html and f"production v{v['good']}" in html and "--force" in html
    n_test = re.search(r"reference events</th><td class=\"num\">(\d+)<", html)
    assert n_test and int(n_test.group(1)) == 105, "the held-out test split (15 % of 700 events)"
    assert html.count("data:image/png;base64,") >= 4, "plots of both models"


def test_a_failing_card_never_blocks_the_promotion(tmp_path: Path, models,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(modelcard, "write_card", broken)
    home = tmp_path / "home"
    v = _register(home, models, "good")
    assert promote_main(["zdc", "--home", str(home)]) == 0
    assert str(mlflow_client(home).get_registered_model("zdc").aliases["production"]) == v["good"]
    assert modelcard.TAG_MODEL_CARD not in mlflow_client(home).get_model_version("zdc", v["good"]).tags
