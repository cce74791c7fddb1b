"""Plotly figures of one search: history, learning curves by rung, parallel coordinates,
importances and the Pareto front. Pure functions of :mod:`calotune.dashboard.data` records.

Every figure sets ``uirevision``, so a page refreshed while a search runs keeps the user's
zoom and hidden traces.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from calotune.dashboard.data import Search, Trial

#: One colour per trial state, used by every figure and the trials table.
STATE_COLOURS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728", "running": "#2ca02c",
                 "interrupted": "#7f7f7f"}


def _layout(fig: go.Figure, title: str, x: str, y: str, key: str) -> go.Figure:
    """Common layout. ``title`` is kept in the figure's metadata only: the page shows it as a
    heading above the graph, where it never collides with plotly's mode bar."""
    fig.update_layout(xaxis_title=x, yaxis_title=y, template="plotly_white", height=360,
                      margin={"l": 60, "r": 20, "t": 30, "b": 50}, uirevision=key, legend={"font": {"size": 11}},
                      meta={"title": title})
    return fig


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def empty(title: str, note: str) -> go.Figure:
    """A titled figure that says why it is empty (rather than a blank box)."""
    fig = go.Figure()
    wrapped = "<br>".join(_wrap(note, 50))
    fig.add_annotation(text=wrapped, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, "", "", title)


def history(search: Search, best: Trial | None) -> go.Figure:
    """Objective per trial in start order, coloured by state, with the best so far."""
    metric, sign = search.metric, (1.0 if search.mode == "min" else -1.0)
    points = [(i, t) for i, t in enumerate(search.trials, 1) if t.latest(metric) is not None]
    if not points:
        return empty("Optimisation history", "no trial has reported a score yet")
    fig = go.Figure()
    for state, colour in STATE_COLOURS.items():
        sel = [(i, t) for i, t in points if t.state == state]
        if sel:
            fig.add_trace(go.Scatter(
                x=[i for i, _ in sel], y=[t.latest(metric) for _, t in sel], mode="markers", name=state,
                marker={"color": colour, "size": 9}, text=[t.trial_id for _, t in sel],
                hovertemplate="trial %{text}<br>" + metric + " = %{y:.4g}<extra>" + state + "</extra>"))
    running_best, xs, ys = None, [], []
    for i, t in points:
        if t.state != "complete" or t.objective(metric) is None:
            continue
        v = float(t.objective(metric))  # type: ignore[arg-type]
        running_best = v if running_best is None or sign * v < sign * running_best else running_best
        xs.append(i)
        ys.append(running_best)
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best complete so far",
                                 line={"shape": "hv", "color": "black", "width": 1}))
    if best is not None and best.latest(metric) is not None:
        i = next(i for i, t in points if t is best) if any(t is best for _, t in points) else None
        if i is not None:
            fig.add_trace(go.Scatter(x=[i], y=[best.latest(metric)], mode="markers", name=f"winner {best.trial_id}",
                                     marker={"symbol": "star", "size": 16, "color": "gold",
                                             "line": {"color": "black", "width": 1}}))
    return _layout(fig, "Optimisation history", "trial (start order)", f"{metric} ({search.mode})", "history")


def learning_curves(search: Search, curves: dict[str, list[tuple[int, float]]], best: Trial | None,
                    quantity: str | None = None) -> go.Figure:
    """Validation curves per trial; dotted lines mark the rungs at which trials were pruned.

    ``quantity``: another per-epoch number than the objective (a family's health metric)."""
    title = f"Model health: {quantity.removeprefix('health_')} per epoch" if quantity else "Learning curves by rung"
    if not curves:
        return empty(title, "no epoch has been scored yet")
    by_id = {t.trial_id: t for t in search.trials}
    fig = go.Figure()
    for trial_id, points in curves.items():
        t = by_id.get(trial_id)
        state = t.state if t else "running"
        winner = best is not None and trial_id == best.trial_id
        fig.add_trace(go.Scatter(
            x=[e for e, _ in points], y=[v for _, v in points], mode="lines+markers",
            name=f"{trial_id} ({state})" + (" winner" if winner else ""),
            line={"color": STATE_COLOURS.get(state, "#999"), "width": 3 if winner else 1.2,
                  "dash": "solid" if state in {"complete", "running"} else "dot"},
            marker={"size": 5}))
    for rung in sorted({t.epochs for t in search.trials if t.state == "pruned" and t.epochs}):
        fig.add_vline(x=rung, line={"dash": "dot", "color": "#ff7f0e", "width": 1},
                      annotation_text=f"rung {rung}", annotation_position="top")
    return _layout(fig, title, "epoch", quantity or f"validation {search.metric}", quantity or "curves")


def _dimension(name: str, values: list[Any]) -> dict[str, Any] | None:
    """A parallel-coordinates axis; None for a parameter that never varies (it explains nothing)."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return {"label": name, "values": [float(v) for v in values]} if min(values) < max(values) else None
    labels = sorted({repr(v) for v in values})
    if len(labels) < 2:
        return None
    return {"label": name, "values": [labels.index(repr(v)) for v in values],
            "tickvals": list(range(len(labels))), "ticktext": labels}


def parallel_coordinates(search: Search) -> go.Figure:
    """Parameters against the first objective for the trials that have a score."""
    metric = search.metric
    scored = [t for t in search.trials if t.latest(metric) is not None and not t.orphaned]
    names = sorted({k for t in scored for k in t.params})
    if len(scored) < 2 or not names:
        return empty("Parallel coordinates", "needs at least 2 scored trials")
    dims = []
    for name in names:
        have = [t for t in scored if name in t.params]
        if len(have) != len(scored):  # a conditional parameter: shown where it exists only
            continue
        dim = _dimension(name, [t.params[name] for t in scored])
        if dim is not None:
            dims.append(dim)
    values = [float(t.latest(metric)) for t in scored]  # type: ignore[arg-type]
    dims.append({"label": metric, "values": values})
    fig = go.Figure(go.Parcoords(
        dimensions=dims, line={"color": values, "colorscale": "Viridis", "showscale": True,
                               "reversescale": search.mode == "min", "colorbar": {"title": metric}}))
    fig = _layout(fig, "Parallel coordinates (colour: objective, better is yellow)", "", "", "parcoords")
    fig.update_layout(margin={"l": 50, "r": 40, "t": 60, "b": 30})
    return fig


def importances(values: dict[str, float], note: str) -> go.Figure:
    if not values:
        return empty("Parameter importances", note)
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                           marker={"color": "#1f77b4"}))
    return _layout(fig, f"Parameter importances ({note})", "importance (fraction of the objective's variance)", "",
                   "importances")


def pareto(search: Search, front: dict[str, Any] | None, best: Trial | None) -> go.Figure:
    """The first two objectives of every scored trial, the front joined, the choice starred."""
    (m1, mode1), (m2, mode2) = search.objectives[:2]
    scored = [t for t in search.trials if t.objective(m1) is not None and t.objective(m2) is not None]
    if not scored:
        return empty("Pareto front", "no trial has both objectives yet")
    on_front = {row["trial"] for row in (front or {}).get("front", [])} or {t.trial_id for t in scored if t.pareto}
    fig = go.Figure()
    rest = [t for t in scored if t.trial_id not in on_front]
    if rest:
        fig.add_trace(go.Scatter(x=[t.objective(m1) for t in rest], y=[t.objective(m2) for t in rest],
                                 mode="markers", name="dominated", text=[t.trial_id for t in rest],
                                 marker={"color": "#bbb", "size": 8}))
    members = sorted((t for t in scored if t.trial_id in on_front), key=lambda t: t.objective(m1))  # type: ignore[arg-type,return-value]
    if members:
        fig.add_trace(go.Scatter(x=[t.objective(m1) for t in members], y=[t.objective(m2) for t in members],
                                 mode="lines+markers", name="Pareto front", text=[t.trial_id for t in members],
                                 line={"shape": "hv", "color": "#1f77b4"}, marker={"size": 10}))
    if best is not None and best.objective(m1) is not None and best.objective(m2) is not None:
        rule = search.params.get("select", front.get("select") if front else None) or "select rule"
        fig.add_trace(go.Scatter(x=[best.objective(m1)], y=[best.objective(m2)], mode="markers",
                                 name=f"chosen {best.trial_id} ({rule})",
                                 marker={"symbol": "star", "size": 18, "color": "gold",
                                         "line": {"color": "black", "width": 1}}))
    return _layout(fig, "Pareto front", f"{m1} ({mode1})", f"{m2} ({mode2})", "pareto")
