"""The Dash application: pages for searches and registered models, and an artifact route.

Pages (paths):

- ``/``: every search in the store, newest first, with its state and winner;
- ``/search/<name>``: one search: the winner and why it won (validation ranking, held-out
  test score against the default configuration), its physics plots against the reference,
  the trials with their states, history, learning curves by rung, parallel coordinates,
  parameter importances and, for several objectives, the Pareto front;
- ``/models`` and ``/model/<name>``: a registered model (one per detector geometry): its
  versions, aliases and promotion history with the scores of both sides;
- ``/artifact/<run_id>/<path>``: a plot PNG (or model card) of a run, read from the store.

A ``dcc.Interval`` re-reads the store every few seconds; the page is re-rendered only when
what it shows changed (trial states, epochs, tags), so plots keep their zoom in between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any
from urllib.parse import quote, unquote

import dash
from dash import Input, Output, State, dcc, html

from calotune.dashboard import figures
from calotune.dashboard.data import MODEL_CARD_TAG, Model, Search, Store, Trial, importances

log = logging.getLogger(__name__)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #16324f; color: white; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #dfe9f5; text-decoration: none; font-weight: 600; }
header .brand { font-size: 20px; color: white; }
header .store { margin-left: auto; font-size: 12px; color: #b7c7d9; }
main { padding: 16px 24px; max-width: 1400px; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 18px; margin: 22px 0 8px; }
h3 { font-size: 15px; margin: 0 0 4px; font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
.card { background: white; border: 1px solid #d8dee6; border-radius: 6px; padding: 12px 16px; margin: 8px 0; }
.winner { border-left: 6px solid gold; }
.muted { color: #666; font-size: 13px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: white; font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 8px; }
.plots figure { margin: 0; background: white; border: 1px solid #ddd; padding: 4px; }
.plots img { width: 100%; }
.plots figcaption { font-size: 12px; color: #555; }
"""

_INDEX = """<!DOCTYPE html>
<html lang="en"><head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>""" + _CSS + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body></html>"""

_CARD_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
_BADGE = {**figures.STATE_COLOURS, "finished": "#1f77b4", "killed": "#7f7f7f"}


def _badge(state: str) -> html.Span:
    return html.Span(state, className="badge", style={"background": _BADGE.get(state.split()[0], "#555")})


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + " UTC" if ms else "-"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]], table_id: str) -> html.Table:
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in header])),
                       html.Tbody([html.Tr([html.Td(c) for c in row]) for row in rows])], id=table_id)


# --- pages -------------------------------------------------------------------------------
def searches_page(store: Store) -> tuple[list, str]:
    found = store.searches()
    signature = json.dumps([(s.name, s.state, s.tags.get("calotune.registered")) for s in found])
    if not found:
        return [html.H1("Searches"), html.P(f"No search in {store.label} yet. Start one with "
                                            "python -m calotune.search SPACE; this page updates itself.",
                                            id="no-searches")], signature
    rows = []
    for s in found:
        best_test = s.metrics.get(f"best_test_{s.metric}")
        rows.append([dcc.Link(s.name, href=f"/search/{quote(s.name)}"), _badge(s.state),
                     f"{s.params.get('family', '?')} on {s.params.get('detector', '?')}", s.experiment,
                     f"{s.metric} ({s.mode})", _fmt(best_test), s.registered or "-", _when(s.start_ms)])
    latest = found[0]
    return [html.H1("Searches"),
            html.P(["Latest: ", dcc.Link(latest.name, href=f"/search/{quote(latest.name)}", id="latest-search"),
                    " ", _badge(latest.state)]),
            _table(["search", "state", "family on detector", "experiment", "objective", "best held-out",
                    "registered", "started"], rows, "searches")], signature


def _plots(store: Store, trial: Trial, role: str) -> html.Div:
    paths = store.plots(trial.run_id)
    if not paths:
        note = ("the plots are made after the search ends" if trial.state in {"running", "complete"}
                else "no plots for this trial")
        return html.Div([html.H2(f"Physics plots: {role} {trial.trial_id}"), html.P(note, className="muted")])
    items = [html.Figure([html.Img(src=f"/artifact/{trial.run_id}/{quote(p)}", alt=p, className="physics-plot"),
                          html.Figcaption(p.rsplit("/", 1)[-1])]) for p in paths]
    return html.Div([html.H2(f"Physics plots: {role} trial {trial.trial_id} vs the reference (held-out split)"),
                     html.Div(items, className="plots", id=f"plots-{trial.trial_id}")])


def _why(search: Search, best: Trial) -> list:
    """The sentences that say why ``best`` won, from what the search recorded."""
    metric, mode = search.metric, search.mode
    sign = 1.0 if mode == "min" else -1.0
    out: list = []
    if len(search.objectives) > 1:
        names = ", ".join(m for m, _ in search.objectives)
        out.append(f"Chosen from the Pareto front of {names} by the space's select rule "
                   f"({search.params.get('select', 'first')}).")
    others = sorted((t for t in search.trials if t is not best and t.state == "complete"
                     and t.objective(metric) is not None), key=lambda t: sign * float(t.objective(metric)))  # type: ignore[arg-type]
    mine = best.latest(metric)
    if mine is not None:
        n = sum(t.state == "complete" for t in search.trials)
        text = (f"Best validation {metric} ({'lower' if mode == 'min' else 'higher'} is better) among "
                f"{n} complete trial{'' if n == 1 else 's'}: {mine:.5g}")
        if others:
            text += f", runner-up {others[0].trial_id} at {float(others[0].objective(metric)):.5g}"  # type: ignore[arg-type]
        out.append(text + ".")
    best_test = search.metrics.get(f"best_test_{metric}")
    default_test = search.metrics.get(f"default_test_{metric}")
    if best_test is not None:
        text = f"On the held-out test split, which no trial was selected on: {best_test:.5g}"
        if default_test is not None:
            same = abs(best_test - default_test) <= 1e-12 * max(1.0, abs(best_test))
            text += (f" against {default_test:.5g} for the default configuration"
                     + (" (the winner is the default configuration itself)." if same else "."))
        out.append(text)
    elif search.state == "running":
        out.append("Held-out test scores and plots appear when the search ends.")
    return [html.Li(x) for x in out]


def search_page(store: Store, name: str) -> tuple[list, str]:
    search = store.search(name)
    if search is None:
        return [html.H1("No such search"), html.P(f"{name!r} is not a search in {store.label}.", id="not-found")], ""
    registered = search.registered
    version = None
    if registered and "/" in registered:
        model_name, _, number = registered.rpartition("/")
        model = store.model(model_name)
        version = next((v for v in (model.versions if model else []) if v.version == number), None)
    best = search.best(version.tags.get("trial") if version else None)
    signature = json.dumps([search.state, registered, [(t.trial_id, t.state, t.epochs, t.end_ms,
                                                        sorted(t.metrics)) for t in search.trials]])
    counts = search.counts()
    p = search.params
    head = [html.H1(["Search ", html.Span(search.name, id="search-name"), " ", _badge(search.state)]),
            html.P(f"{p.get('family', '?')} on {p.get('detector', '?')}: {p.get('trials', '?')} trials x "
                   f"{p.get('max_epochs', '?')} epochs, sampler {p.get('sampler', '?')}, scheduler "
                   f"{search.scheduler}; objective {', '.join(f'{m} ({d})' for m, d in search.objectives)}; "
                   f"started {_when(search.start_ms)}; space {p.get('space', '?')}", className="muted"),
            html.P(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trial yet",
                   id="state-counts")]
    body: list = []
    if best is not None:
        params = _table(["parameter", "value"], [[k, _fmt(v)] for k, v in sorted(best.params.items())],
                        "winner-params")
        reg = []
        if registered:
            model_name = registered.rpartition("/")[0]
            reg = [html.P(["Registered as ", dcc.Link(registered, href=f"/model/{quote(model_name)}", id="registered"),
                           f" (aliases: {', '.join(version.aliases) or 'none'})" if version else ""])]
        body.append(html.Div([html.H2(["Winner: trial ", html.Span(best.trial_id, id="winner-trial"), " ",
                                       _badge(best.state)]),
                              html.Ul(_why(search, best), id="why"), *reg, params], className="card winner"))
    else:
        body.append(html.Div(html.P("No trial has a score yet."), className="card"))
    # Physics plots: the winner, then the default configuration (the other held-out trial).
    if best is not None:
        body.append(_plots(store, best, "winner"))
        for t in search.held_out():
            if t is not best:
                body.append(_plots(store, t, "default configuration"))
    rows = []
    for t in search.trials:
        test = t.metrics.get(f"test_{search.metric}")
        rows.append([html.Span(t.trial_id, className="trial-id"), _badge(t.state), t.state_text(search.scheduler),
                     str(t.epochs), _fmt(t.latest(search.metric)), _fmt(test),
                     ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items()))])
    body += [html.H2("Trials"),
             _table(["trial", "state", "detail", "epochs", f"validation {search.metric}",
                     f"held-out {search.metric}", "parameters"], rows, "trials")]
    curves = store.curves(search, search.metric)
    imp, note = importances(search)
    figs = {"history": figures.history(search, best),
            "curves": figures.learning_curves(search, curves, best),
            "parcoords": figures.parallel_coordinates(search),
            "importances": figures.importances(imp, note)}
    if len(search.objectives) > 1:
        figs["pareto"] = figures.pareto(search, store.pareto_front(search), best)
    for key in search.health_keys():  # the family's own numbers: codebook usage, RBM partitions
        figs[key.replace("_", "-")] = figures.learning_curves(search, store.curves(search, "", key=key), best, key)
    graphs = [html.Div([html.H3(fig.layout.meta["title"]),
                        dcc.Graph(id=key, figure=fig, config={"displaylogo": False, "displayModeBar": "hover"})],
                       className="card") for key, fig in figs.items()]
    body += [html.H2("How the search went"), html.Div(graphs, className="grid")]
    return head + body, signature


def models_page(store: Store) -> tuple[list, str]:
    models = store.models()
    signature = json.dumps([(m.name, m.aliases, len(m.versions)) for m in models])
    if not models:
        return [html.H1("Registered models"), html.P("No registered model yet: a search registers its winner.",
                                                     id="no-models")], signature
    rows = [[dcc.Link(m.name, href=f"/model/{quote(m.name)}"), str(len(m.versions)),
             ", ".join(f"{a} -> v{v}" for a, v in sorted(m.aliases.items())) or "-"] for m in models]
    return [html.H1("Registered models"),
            html.P("One registered model per detector geometry.", className="muted"),
            _table(["model", "versions", "aliases"], rows, "models")], signature


def _card_link(version) -> Any:
    """A link to the version's model card (written by ``calotune.promote``), served from the store."""
    card = version.tags.get(MODEL_CARD_TAG)
    if not card:
        return "-"
    run_id = version.tags.get(f"{MODEL_CARD_TAG}_run") or version.run_id
    path = version.tags.get(f"{MODEL_CARD_TAG}_path")
    if path is None and "/model_card/" in card:  # the artifact URI: its path inside the run
        path = "model_card/" + card.rsplit("/model_card/", 1)[1]
    if run_id and path:
        return html.A("model card", href=f"/artifact/{run_id}/{quote(path)}", className="model-card")
    return card


def model_page(store: Store, name: str) -> tuple[list, str]:
    model: Model | None = store.model(name)
    if model is None:
        return [html.H1("No such model"), html.P(f"{name!r} is not registered in {store.label}.", id="not-found")], ""
    signature = json.dumps([model.aliases, [(v.version, sorted(v.tags.items())) for v in model.versions]])
    rows = []
    for v in model.versions:
        t = v.tags
        search = t.get("search")
        rows.append([f"v{v.version}", ", ".join(v.aliases) or "-",
                     dcc.Link(search, href=f"/search/{quote(search)}") if search else "-", t.get("trial", "-"),
                     f"{t.get('objective', '?')} ({t.get('mode', '?')})", t.get("score", "-"),
                     t.get("baseline_score", "-"), _when(v.created_ms), _card_link(v)])
    history = []
    for v in model.history():
        t = v.tags
        history.append([t.get("promoted_at", "-"), f"v{v.version}", t.get("promotion", "-"),
                        t.get("promotion_objective", "-"), t.get("candidate_score", "-"),
                        t.get("production_score", "-"), t.get("replaced_version", "-"),
                        t.get("promoted_by", "-"), t.get("promotion_data_split", "-")])
    aliases = ", ".join(f"{a} -> v{n}" for a, n in sorted(model.aliases.items())) or "none"
    return [html.H1(["Model ", html.Span(model.name, id="model-name")]),
            html.P(["Aliases: ", html.Span(aliases, id="aliases")]),
            html.H2("Versions"),
            _table(["version", "aliases", "search", "trial", "objective", "held-out score",
                    "default config. score", "registered", "model card"], rows, "versions"),
            html.H2("Promotion history"),
            html.P("Each promotion judged the candidate and the production model on the same held-out data; "
                   "both scores are shown.", className="muted"),
            _table(["promoted at", "version", "kind", "objective", "candidate score", "production score (replaced)",
                    "replaced version", "by", "judged on"], history, "promotions")
            if history else html.P("Never promoted: python -m calotune.promote " + model.name, id="no-promotions"),
            ], signature


def render(store: Store, path: str) -> tuple[list, str]:
    """The page at ``path`` and a signature of what it shows (re-rendered when it changes)."""
    path = unquote(path or "/")
    if path.startswith("/search/"):
        return search_page(store, path.removeprefix("/search/"))
    if path.startswith("/model/"):
        return model_page(store, path.removeprefix("/model/"))
    if path.rstrip("/") == "/models":
        return models_page(store)
    return searches_page(store)


# --- the app -----------------------------------------------------------------------------
def create_app(store: Store, refresh_s: float = 5.0) -> dash.Dash:
    """A Dash app on ``store``; its Flask server is ``app.server``."""
    import flask

    app = dash.Dash(__name__, title="calotune dashboard", update_title=None, suppress_callback_exceptions=True,
                    serve_locally=True)
    app.index_string = _INDEX
    app.layout = html.Div([
        dcc.Location(id="url"),
        html.Header([dcc.Link("calotune", href="/", className="brand"), dcc.Link("Searches", href="/"),
                     dcc.Link("Models", href="/models"), html.Span(store.label, className="store")]),
        html.Main(html.Div(id="page")),
        dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
        dcc.Store(id="shown"),
    ])

    @app.callback(Output("page", "children"), Output("shown", "data"),
                  Input("url", "pathname"), Input("tick", "n_intervals"), State("shown", "data"))
    def _update(pathname: str | None, _n: int | None, shown: dict | None):
        try:
            children, signature = render(store, pathname or "/")
        except Exception as exc:  # the store went away or is busy: say so, retry on the next tick
            log.warning("cannot read %s: %s", store.label, exc)
            return html.Div([html.H1("Store not readable"), html.P(str(exc).splitlines()[0] if str(exc) else
                                                                   type(exc).__name__, id="store-error")]), None
        key = hashlib.sha1(f"{pathname}\0{signature}".encode()).hexdigest()
        triggered = dash.callback_context.triggered_id
        if triggered == "tick" and shown and shown.get("key") == key:
            return dash.no_update, dash.no_update
        return children, {"key": key}

    @app.server.route("/artifact/<run_id>/<path:path>")
    def _artifact(run_id: str, path: str):
        local = store.artifact(run_id, path)
        if local is None:
            flask.abort(404)
        response = flask.send_file(local, max_age=3600)
        if local.suffix == ".html":  # a model card from the store: no scripts, no external loads
            response.headers["Content-Security-Policy"] = _CARD_CSP
        return response

    return app
