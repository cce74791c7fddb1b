"""The dashboard's data layer, pages, artifact route and CLI, in-process and without Ray.

The store is written through calotune's own :class:`Tracker` (the code the search's MLflow
callback and ``_finish`` use), with the records a search leaves: trials complete, pruned by
ASHA at a rung, pruned by the family with a reason, failed with a reason, still running;
held-out scores and plots on the winner and the default configuration; a registered
version with a promotion record. The browser test (``test_browser.py``) checks the same
pages against a real search.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calotune.dashboard import figures
from calotune.dashboard.__main__ import main as dashboard_main
from calotune.dashboard.app import create_app, render
from calotune.dashboard.data import Search, Store, Trial, importances
from calotune.tracking.mlflow_tracker import Tracker

SEARCH = "zdc_swiglu_tiny-20260101-000000-aaaa"
PARETO = "zdc_swiglu_pareto-20260102-000000-bbbb"
MODEL = "zdc-gtest"
FAIL_REASON = "Traceback (most recent call last):\n  ...\nNonFiniteLossError: loss is nan at step 3"


def _png(path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=30)
    return path


def _trial(tracker: Tracker, trial_id: str, params: dict[str, Any], curve: list[float], state: str | None,
           reason: str | None = None, final: dict[str, float] | None = None) -> str:
    run_id = tracker.trial_run(trial_id, params)
    for epoch, value in enumerate(curve, 1):
        tracker.log_metrics(run_id, {"mean_separation_epoch": value, "training_iteration": epoch}, step=epoch)
    if final:
        tracker.log_metrics(run_id, final, step=len(curve))
    if state is not None:
        tracker.end_trial(trial_id, state, reason=reason)
    return run_id


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("dashboard")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracker = Tracker(uri, "zdc_swiglu_tiny", home / "artifacts")
    tracker.create_search(SEARCH, {"family": "zdc_swiglu", "detector": "zdc", "objectives": "mean_separation:min",
                                   "trials": 6, "max_epochs": 2, "scheduler": "asha", "sampler": "tpe"}, {})
    best = _trial(tracker, "t1", {"lr_generator": 0.001, "mask_loss_weight": 0.5}, [0.60, 0.50], "complete",
                  final={"mean_separation": 0.50, "test_mean_separation": 0.55})
    default = _trial(tracker, "t2", {"lr_generator": 0.002, "mask_loss_weight": 1.0}, [0.62, 0.58], "complete",
                     final={"mean_separation": 0.58, "test_mean_separation": 0.61})
    _trial(tracker, "t3", {"lr_generator": 0.004, "mask_loss_weight": 1.5}, [0.70], "pruned",
           final={"mean_separation": 0.70})
    _trial(tracker, "t4", {"lr_generator": 0.0049, "mask_loss_weight": 1.9}, [0.9], "failed", reason=FAIL_REASON)
    _trial(tracker, "t5", {"lr_generator": 0.0002, "mask_loss_weight": 0.1}, [0.8], "pruned",
           reason="codebook collapse: 2 of 64 codes used", final={"mean_separation": 0.8})
    _trial(tracker, "t6", {"lr_generator": 0.0007, "mask_loss_weight": 0.7}, [0.65], None)
    for epoch, usage in ((1, 0.4), (2, 0.9)):  # a family's health number (codebook usage)
        tracker.log_metrics(best, {"health_codebook_usage": usage}, step=epoch)
    for run_id, trial in ((best, "t1"), (default, "t2")):
        plots = home / "plots" / trial
        _png(plots / "zdc_hcal_fraction.png")
        tracker.log_artifacts(run_id, plots, "plots")
    model_dir = home / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text("{}")
    tracker.log_artifacts(best, model_dir, "model")
    version = tracker.register(best, "model", MODEL, "candidate", {
        "search": SEARCH, "trial": "t1", "score": "0.55", "objective": "mean_separation", "mode": "min",
        "baseline_score": "0.61"})
    tracker.set_tags(tracker.parent_run_id, {"calotune.registered": f"{MODEL}/{version}",
                                             "calotune.state": "finished"})
    tracker.end_search("FINISHED", {"best_test_mean_separation": 0.55, "default_test_mean_separation": 0.61})
    client = tracker.client
    for key, value in {"promoted_at": "2026-01-01T01:00:00+0000", "promotion": "first",
                       "promotion_objective": "mean_separation", "candidate_score": "0.55",
                       "production_score": "0.9", "replaced_version": "none", "promoted_by": "tester"}.items():
        client.set_model_version_tag(MODEL, version, key, value)
    client.set_registered_model_alias(MODEL, "production", version)
    card = home / "card"
    card.mkdir()
    (card / "model_card.html").write_text("<html><body><h1>Model card t1</h1></body></html>")
    tracker.log_artifacts(best, card, "model_card")
    client.set_model_version_tag(MODEL, version, "calotune.model_card",  # as calotune.promote writes it
                                 f"{client.get_run(best).info.artifact_uri}/model_card/model_card.html")

    # A second search, still running, with two objectives and a Pareto front.
    pareto = Tracker(uri, "zdc_swiglu_pareto", home / "artifacts")
    pareto.create_search(PARETO, {"family": "zdc_swiglu", "detector": "zdc", "select": "knee",
                                  "objectives": "mean_separation:min,gen_time_ms:min", "trials": 4,
                                  "max_epochs": 2, "scheduler": "none"}, {})
    for trial_id, sep, ms, on_front in (("p1", 0.5, 9.0, True), ("p2", 0.7, 2.0, True), ("p3", 0.8, 8.0, False)):
        run_id = _trial(pareto, trial_id, {"low_rank": 4, "use_moe": trial_id == "p2"}, [sep + 0.1, sep], "complete",
                        final={"mean_separation": sep, "gen_time_ms": ms})
        pareto.set_tags(run_id, {"calotune.pareto": str(on_front).lower()})
    return home


@pytest.fixture()
def store(home: Path) -> Store:
    store = Store(f"sqlite:///{home / 'mlflow.db'}")
    yield store
    store.close()


def find(component: Any, component_id: str) -> Any:
    """The component with ``id`` in a Dash tree (or a list of trees), else None."""
    if isinstance(component, list | tuple):
        for c in component:
            hit = find(c, component_id)
            if hit is not None:
                return hit
        return None
    if getattr(component, "id", None) == component_id:
        return component
    children = getattr(component, "children", None)
    return None if children is None or isinstance(children, str) else find(children, component_id)


def _walk(component: Any) -> Iterator[Any]:
    if isinstance(component, list | tuple):
        for c in component:
            yield from _walk(c)
        return
    yield component
    children = getattr(component, "children", None)
    if children is not None and not isinstance(children, str):
        yield from _walk(children)


def text(component: Any) -> str:
    """All the text a Dash tree shows."""
    if component is None:
        return ""
    if isinstance(component, str | int | float):
        return str(component)
    if isinstance(component, list | tuple):
        return " ".join(text(c) for c in component)
    return text(getattr(component, "children", None))


# --- data layer ----------------------------------------------------------------------
def test_searches_newest_first_with_state(store: Store) -> None:
    found = store.searches()
    assert [s.name for s in found] == [PARETO, SEARCH]
    assert [s.state for s in found] == ["running", "finished"]
    assert found[1].registered == f"{MODEL}/1"


def test_trial_states_say_rung_and_reason(store: Store) -> None:
    search = store.search(SEARCH)
    assert search is not None
    by_id = {t.trial_id: t for t in search.trials}
    assert search.counts() == {"complete": 2, "pruned": 2, "failed": 1, "running": 1}
    assert by_id["t3"].state_text("asha") == "pruned at the epoch-1 rung"
    assert by_id["t5"].state_text("asha") == "pruned at the epoch-1 rung: codebook collapse: 2 of 64 codes used"
    assert by_id["t4"].state_text() == "failed: NonFiniteLossError: loss is nan at step 3"
    assert by_id["t6"].state_text() == "running (epoch 1)"
    assert by_id["t6"].objective("mean_separation") is None  # no final score while running
    assert by_id["t6"].latest("mean_separation") == pytest.approx(0.65)
    assert by_id["t1"].params == {"lr_generator": 0.001, "mask_loss_weight": 0.5}  # typed again


def test_winner_is_the_registered_trial(store: Store) -> None:
    search = store.search(SEARCH)
    assert search is not None
    assert search.best("t2").trial_id == "t2"  # the registry's word wins (a select rule may differ)
    assert search.best().trial_id == "t1"  # else the best final objective of a complete trial
    assert [t.trial_id for t in search.held_out()] == ["t1", "t2"]


def test_learning_curves_mark_the_rungs(store: Store) -> None:
    search = store.search(SEARCH)
    assert search is not None
    curves = store.curves(search, "mean_separation")
    assert curves["t1"] == [(1, pytest.approx(0.60)), (2, pytest.approx(0.50))]
    assert set(curves) == {"t1", "t2", "t3", "t4", "t5", "t6"}
    fig = figures.learning_curves(search, curves, search.best())
    assert [s["x0"] for s in fig.layout.shapes] == [1]  # both pruned trials stopped at the epoch-1 rung
    winner = next(tr for tr in fig.data if tr.name.startswith("t1"))
    assert winner.line.width == 3


def test_history_marks_winner_and_best_so_far(store: Store) -> None:
    search = store.search(SEARCH)
    assert search is not None
    fig = figures.history(search, search.best())
    names = {tr.name for tr in fig.data}
    assert {"complete", "pruned", "failed", "running", "winner t1"} <= names
    best_line = next(tr for tr in fig.data if tr.name == "best complete so far")
    assert list(best_line.y) == [pytest.approx(0.50), pytest.approx(0.50)]


def _synthetic(n: int, objective) -> Search:
    import random

    rng = random.Random(0)
    trials = []
    for i in range(n):
        x, y = rng.uniform(-1, 1), rng.uniform(-1, 1)
        trials.append(Trial(trial_id=f"s{i}", run_id="0" * 32, state="complete", reason=None, epochs=2,
                            params={"x": x, "y": y}, metrics={"mean_separation": objective(x, y)},
                            start_ms=i, end_ms=i))
    return Search(name="s", run_id="0" * 32, experiment="e", experiment_id="1", state="finished",
                  status="FINISHED", start_ms=0, end_ms=1, params={}, metrics={}, tags={}, trials=trials)


def test_importances_find_the_parameter_that_matters() -> None:
    values, note = importances(_synthetic(30, lambda x, y: x * x + 0.01 * y))
    assert set(values) == {"x", "y"}
    assert values["x"] > 0.8 > values["y"]
    assert "fANOVA over 30 complete trials" == note
    assert importances(_synthetic(2, lambda x, y: x)) == ({}, "needs at least 3 complete trials whose "
                                                             "parameters differ (2 complete so far)")


def test_parallel_coordinates_encode_categoricals(store: Store) -> None:
    search = store.search(PARETO)
    assert search is not None
    fig = figures.parallel_coordinates(search)
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert list(dims) == ["use_moe", "mean_separation"]  # low_rank never varies: left out
    assert list(dims["use_moe"].ticktext) == ["False", "True"]


def test_pareto_front_and_choice(store: Store) -> None:
    search = store.search(PARETO)
    assert search is not None
    fig = figures.pareto(search, None, search.best())
    front = next(tr for tr in fig.data if tr.name == "Pareto front")
    assert list(front.text) == ["p1", "p2"]
    assert any(tr.name == "chosen p1 (knee)" for tr in fig.data)


# --- pages -----------------------------------------------------------------------------
def test_search_page_says_who_won_and_why(store: Store) -> None:
    page, _ = render(store, f"/search/{SEARCH}")
    assert text(find(page, "winner-trial")) == "t1"
    why = text(find(page, "why"))
    assert "among 2 complete trials: 0.5, runner-up t2 at 0.58" in why
    assert "0.55 against 0.61 for the default configuration." in why
    assert text(find(page, "registered")) == f"{MODEL}/1"
    trials = text(find(page, "trials"))
    assert "pruned at the epoch-1 rung: codebook collapse" in trials and "NonFiniteLossError" in trials
    for trial in ("t1", "t2"):
        images = find(page, f"plots-{trial}")
        assert images is not None
        assert next(f.children[0].src for f in images.children).endswith("/plots/zdc_hcal_fraction.png")
    for graph in ("history", "curves", "parcoords", "importances"):
        assert find(page, graph) is not None
    assert find(page, "pareto") is None  # one objective
    health = find(page, "health-codebook-usage").figure
    assert health.layout.meta["title"] == "Model health: codebook_usage per epoch"
    assert [list(tr.y) for tr in health.data] == [[0.4, 0.9]]


def test_running_multi_objective_page(store: Store) -> None:
    page, _ = render(store, f"/search/{PARETO}")
    assert find(page, "pareto") is not None
    assert "Held-out test scores and plots appear when the search ends." in text(find(page, "why"))


def test_model_page_shows_promotion_with_both_scores(store: Store) -> None:
    page, _ = render(store, f"/model/{MODEL}")
    assert text(find(page, "aliases")) == "candidate -> v1, production -> v1"
    history = text(find(page, "promotions"))
    assert "0.55" in history and "0.9" in history and "first" in history
    link = find(page, "versions")
    href = next(a.href for a in _walk(link) if getattr(a, "className", None) == "model-card")
    search = store.search(SEARCH)
    assert href == f"/artifact/{search.best().run_id}/model_card/model_card.html"
    response = create_app(store).server.test_client().get(href)
    assert response.status_code == 200 and b"Model card t1" in response.data
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")  # no scripts run
    models, _ = render(store, "/models")
    assert MODEL in text(find(models, "models"))
    assert ".promotion-lock" not in text(models)


def test_unknown_pages_and_signature(store: Store, home: Path) -> None:
    page, _ = render(store, "/search/nope")
    assert find(page, "not-found") is not None
    page, _ = render(store, "/model/nope")
    assert find(page, "not-found") is not None
    _, before = render(store, f"/search/{PARETO}")
    assert render(store, f"/search/{PARETO}")[1] == before  # nothing changed: the page is not re-drawn
    writer = Tracker(f"sqlite:///{home / 'mlflow.db'}", "zdc_swiglu_pareto")
    writer.attach_search(PARETO)
    writer.end_trial("p3", "pruned")
    assert render(store, f"/search/{PARETO}")[1] != before


def test_pages_never_write_the_store(home: Path) -> None:
    db = home / "mlflow.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    store = Store(f"sqlite:///{db}")
    try:
        app = create_app(store)
        client = app.server.test_client()
        assert client.get("/").status_code == 200
        for path in ("/", "/models", f"/search/{SEARCH}", f"/search/{PARETO}", f"/model/{MODEL}"):
            render(store, path)
    finally:
        store.close()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_artifact_route_serves_plots_only(store: Store) -> None:
    search = store.search(SEARCH)
    assert search is not None
    best = search.best()
    client = create_app(store).server.test_client()
    response = client.get(f"/artifact/{best.run_id}/plots/zdc_hcal_fraction.png")
    assert response.status_code == 200
    assert response.data[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (f"/artifact/{best.run_id}/model/model.json",  # exists, but not a plot
                f"/artifact/{best.run_id}/plots/../model/model.json",
                f"/artifact/{best.run_id}/plots/missing.png",
                "/artifact/notarunid/plots/zdc_hcal_fraction.png"):
        assert client.get(bad).status_code == 404, bad


# --- command line --------------------------------------------------------------------
def test_cli_missing_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboard_main(["--home", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store at" in err[0] and "--home" in err[0]


def test_cli_busy_port_is_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert dashboard_main(["--home", str(home), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --port {port}: already in use on 127.0.0.1; pick another port "
                   f"(e.g. --port {port + 1}, or --port 0 for any free one)"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address of this machine"),
    (["--port", "70000"], "--port 70000: must be between 0 and 65535"),
    (["--refresh", "0"], "--refresh 0.0: must be a positive number of seconds"),
])
def test_cli_bad_flags(home: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    assert dashboard_main(["--home", str(home), *flags]) == 2
    assert message in capsys.readouterr().err


def test_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "mlflow.db"
    bad.write_text("not sqlite")
    assert dashboard_main(["--tracking-uri", f"sqlite:///{bad}"]) == 2
    assert "is not a SQLite database" in capsys.readouterr().err
