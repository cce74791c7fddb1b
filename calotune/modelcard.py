"""A model card for every promotion decision: one self-contained HTML file (and a PDF).

``python -m calotune.promote`` judges the candidate and production on the same held-out
sample; the card is the record a reviewer reads afterwards, without MLflow or Python at
hand: the decision and why, the data both were judged on (file, hash, split, sample
sizes), every score of both models next to the reference-vs-reference floor (two disjoint
halves of the same reference: what a perfect generator could reach with this many events,
since every score here has a finite-sample bias, arXiv 2211.10295 for FPD/KPD, arXiv
2009.03796 eq. 15 for the separation power), the lineage of both versions, and the
detector's physics plots of each model against the reference.

The HTML embeds its images as base64 ``data:`` URIs, so the one file can be mailed,
attached to a review or opened from MLflow's artifact view (which shows it in a frame).
The PDF holds the same figures and a table page, drawn with matplotlib's ``PdfPages``
(no extra dependency). jinja2 (installed with MLflow) renders the HTML with escaping on.

Cards are written for refused promotions as well: "why was my candidate not promoted?"
is answered by the same table, and the version's page links to it either way.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Model-version tag holding the card's artifact URI (the dashboard opens it by this name).
TAG_MODEL_CARD = "calotune.model_card"
#: The card's run (the candidate version's source run) and path inside its artifacts.
TAG_MODEL_CARD_RUN = "calotune.model_card_run"
TAG_MODEL_CARD_PATH = "calotune.model_card_path"
ARTIFACT_DIR = "model_card"
HTML_NAME = "model_card.html"
PDF_NAME = "model_card.pdf"


@dataclass
class Side:
    """One of the two models on the card."""

    label: str  # "candidate" / "production"
    version: str | None  # None: there is no such model (a first promotion)
    tags: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] | None = None  # None: not scored (none, or its files are gone)
    n_generated: int = 0
    plots: dict[str, Path] = field(default_factory=dict)  # figure stem -> PNG
    note: str = ""  # why it has no scores, when it has none


@dataclass
class ModelCard:
    """Everything the card shows; built by promote, rendered by :func:`render_html`."""

    model: str
    detector: str
    objective: str
    mode: str
    decision: str  # "promoted" / "not promoted"
    kind: str  # first / better / forced / refused
    reason: str
    candidate: Side
    production: Side
    floor: dict[str, float]  # reference half A vs half B
    objectives: dict[str, str]  # score -> mode, from the detector
    reference_path: str
    reference_hash: str
    reference_split: str
    n_reference: int
    floor_sizes: tuple[int, int]
    promoted_by: str
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    command: str = ""
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per score: both models, the floor and which side is better."""
        names = sorted(set(self.candidate.scores or {}) | set(self.production.scores or {}) | set(self.floor),
                       key=lambda k: (k != self.objective, k))
        out = []
        for name in names:
            # a diagnostic that is no score (e.g. a mean the separation power is built on) has
            # no direction, so no side is "better" on it
            mode = self.objectives.get(name, self.mode if name == self.objective else "")
            c = (self.candidate.scores or {}).get(name)
            p = (self.production.scores or {}).get(name)
            better = ""
            if mode and _finite(c) and _finite(p) and c != p:
                better = "candidate" if (c < p if mode == "min" else c > p) else "production"
            out.append({"name": name, "mode": mode, "candidate": _fmt(c), "production": _fmt(p),
                        "floor": _fmt(self.floor.get(name)), "better": better,
                        "objective": name == self.objective})
        return out

    def figures(self) -> list[str]:
        return sorted(set(self.candidate.plots) | set(self.production.plots))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if not _finite(x):
        return str(x)
    return f"{x:.5g}"


def reference_floor(detector, reference, seed: int = 0) -> tuple[dict[str, float], tuple[int, int]]:
    """Scores of one random half of the reference against the other half, and the halves'
    sizes: the floor a perfect generator reaches with this many events."""
    n = len(reference)
    if n < 4:
        return {}, (0, 0)
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    a, b = np.sort(perm[:half]), np.sort(perm[half:2 * half])
    return detector.scores(reference.subset(a), reference.subset(b)), (len(a), len(b))


def plot_side(detector, reference, generated, out_dir: Path) -> dict[str, Path]:
    """The detector's reference-vs-generated figures for one model, by file stem."""
    return {p.stem: p for p in detector.plot(reference, generated, out_dir)}


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Model card: {{ c.model }} v{{ c.candidate.version }} ({{ c.decision }})</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1f2328; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
.badge { display: inline-block; padding: .25em .7em; border-radius: 1em; font-weight: 600; color: #fff; }
.promoted { background: #1a7f37; } .refused { background: #cf222e; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #d0d7de; padding: .3em .7em; }
th { background: #f6f8fa; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.objective td { font-weight: 600; background: #fff8c5; }
.better-candidate { color: #1a7f37; } .better-production { color: #cf222e; }
.figs { display: grid; grid-template-columns: 1fr 1fr; gap: .8em; }
.figs img { width: 100%; border: 1px solid #d0d7de; } .muted { color: #656d76; font-size: .9em; }
code { background: #f6f8fa; padding: 0 .3em; border-radius: 4px; }
</style></head><body>
<h1>Model card: <code>{{ c.model }}</code> version {{ c.candidate.version }}</h1>
<p><span class="badge {{ 'promoted' if c.decision == 'promoted' else 'refused' }}">{{ c.decision }}</span>
 &nbsp;{{ c.kind }} &middot; detector <code>{{ c.detector }}</code> &middot; {{ c.when }}
 &middot; by {{ c.promoted_by }}</p>

<h2>Decision</h2>
<p>{{ c.reason }}</p>
<p>Objective <code>{{ c.objective }}</code> ({{ 'lower' if c.mode == 'min' else 'higher' }} is better).
Candidate: version {{ c.candidate.version }}{% if c.candidate.tags.get('search') %}, search
<code>{{ c.candidate.tags.get('search') }}</code>, trial
<code>{{ c.candidate.tags.get('trial', '?') }}</code>{% endif %}.
Production before this decision: {% if c.production.version %}version {{ c.production.version }}{% if
c.production.tags.get('search') %}, search <code>{{ c.production.tags.get('search') }}</code>{% endif %}{% else %}none
(first promotion){% endif %}.</p>

<h2>Held-out data</h2>
<table>
<tr><th>reference file</th><td><code>{{ c.reference_path }}</code></td></tr>
<tr><th>sha256 (first 16)</th><td><code>{{ c.reference_hash }}</code></td></tr>
<tr><th>events used</th><td>{{ c.reference_split }}</td></tr>
<tr><th>reference events</th><td class="num">{{ c.n_reference }}</td></tr>
<tr><th>generated events</th><td>candidate {{ c.candidate.n_generated }}{% if c.production.version %},
 production {{ c.production.n_generated }}{% endif %} (one per reference condition)</td></tr>
<tr><th>floor</th><td>reference half A ({{ c.floor_sizes[0] }} events) vs half B
 ({{ c.floor_sizes[1] }} events)</td></tr>
</table>

<h2>Scores</h2>
<table>
<tr><th>score</th><th>direction</th><th>candidate v{{ c.candidate.version }}</th>
<th>production{% if c.production.version %} v{{ c.production.version }}{% endif %}</th>
<th>floor (ref vs ref)</th><th>better side</th></tr>
{% for r in c.rows() %}<tr class="{{ 'objective' if r.objective else '' }}"><td><code>{{ r.name }}</code>{%
if r.objective %} (objective){% endif %}</td><td>{{ {'min': 'lower', 'max': 'higher'}.get(r.mode, 'diagnostic') }}</td>
<td class="num">{{ r.candidate }}</td><td class="num">{{ r.production }}</td><td class="num">{{ r.floor }}</td>
<td class="better-{{ r.better }}">{{ r.better }}</td></tr>
{% endfor %}</table>
{% if c.production.note %}<p class="muted">Production: {{ c.production.note }}</p>{% endif %}
{% for n in c.notes %}<p class="muted">{{ n }}</p>{% endfor %}

<h2>Lineage</h2>
<table><tr><th></th><th>candidate v{{ c.candidate.version }}</th><th>production{% if c.production.version
%} v{{ c.production.version }}{% endif %}</th></tr>
{% for key in lineage_keys if c.candidate.tags.get(key) or c.production.tags.get(key) %}<tr><th>{{ key }}</th>
<td><code>{{ c.candidate.tags.get(key, '') }}</code></td>
<td><code>{{ c.production.tags.get(key, '') }}</code></td></tr>{% endfor %}
</table>

<h2>Physics plots: generated vs held-out reference</h2>
{% if figures %}<div class="figs"><div><b>candidate v{{ c.candidate.version }}</b></div><div><b>production{% if
c.production.version %} v{{ c.production.version }}{% endif %}</b></div>
{% for stem, cand, prod in figures %}<div>{% if cand %}<img alt="{{ stem }} candidate" src="{{ cand }}">{% else
%}<p class="muted">{{ stem }}: no plot</p>{% endif %}</div>
<div>{% if prod %}<img alt="{{ stem }} production" src="{{ prod }}">{% else %}<p class="muted">{{ stem }}: {{
'no production model' if not c.production.version else 'not scored' }}</p>{% endif %}</div>
{% endfor %}</div>{% else %}<p class="muted">No plots.</p>{% endif %}

<p class="muted">Written by <code>{{ c.command or 'python -m calotune.promote' }}</code> (calotune). The file is
self-contained: images are embedded.</p>
</body></html>
"""

LINEAGE_KEYS = ("search", "trial", "objective", "score", "baseline_score", "data_path", "data_hash", "split_seed",
                "validation_fraction", "test_fraction", "calotune.parent_model", "train_phases", "user")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(card: ModelCard) -> str:
    """The card as one HTML document with every image inlined."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    figures = [(stem, _data_uri(card.candidate.plots[stem]) if stem in card.candidate.plots else "",
                _data_uri(card.production.plots[stem]) if stem in card.production.plots else "")
               for stem in card.figures()]
    return env.from_string(_TEMPLATE).render(c=card, figures=figures, lineage_keys=LINEAGE_KEYS)


def render_pdf(card: ModelCard, path: Path) -> Path:
    """The same card as a PDF: a table page, then one page per figure (candidate | production)."""
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    with PdfPages(path) as pdf:
        fig = Figure(figsize=(8.27, 11.69))  # A4 portrait
        fig.text(0.06, 0.96, f"Model card: {card.model} v{card.candidate.version}: {card.decision} ({card.kind})",
                 fontsize=13, weight="bold", va="top")
        lines = [card.reason, "",
                 f"objective {card.objective} ({card.mode}); detector {card.detector}; {card.when}; "
                 f"by {card.promoted_by}",
                 f"data {card.reference_path} (sha256 {card.reference_hash}), {card.reference_split}",
                 f"reference {card.n_reference} events; floor halves {card.floor_sizes[0]} / {card.floor_sizes[1]}"]
        y = 0.92
        for text in lines:
            for chunk in [text[i:i + 110] for i in range(0, max(len(text), 1), 110)]:
                fig.text(0.06, y, chunk, fontsize=8, va="top")
                y -= 0.018
        rows = card.rows()
        ax = fig.add_axes((0.06, 0.05, 0.88, max(0.1, y - 0.08)))
        ax.axis("off")
        if rows:
            table = ax.table(cellText=[[r["name"], r["mode"], r["candidate"], r["production"], r["floor"], r["better"]]
                                       for r in rows],
                             colLabels=["score", "mode", f"candidate v{card.candidate.version}",
                                        "production" + (f" v{card.production.version}" if card.production.version
                                                        else ""), "floor", "better"],
                             loc="upper center", cellLoc="left")
            table.auto_set_font_size(False)
            table.set_fontsize(7)
        pdf.savefig(fig)
        for stem in card.figures():
            fig = Figure(figsize=(11.69, 5.2))
            fig.suptitle(stem, fontsize=11)
            for i, side in enumerate((card.candidate, card.production)):
                ax = fig.add_subplot(1, 2, i + 1)
                ax.axis("off")
                ax.set_title(f"{side.label}" + (f" v{side.version}" if side.version else ""), fontsize=9)
                if stem in side.plots:
                    ax.imshow(mpimg.imread(side.plots[stem]))
            pdf.savefig(fig)
    return path


def write_card(card: ModelCard, out_dir: Path) -> tuple[Path, Path]:
    """``model_card.html`` and ``model_card.pdf`` in ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / HTML_NAME
    html.write_text(render_html(card), encoding="utf-8")
    pdf = render_pdf(card, out_dir / PDF_NAME)
    return html, pdf


def publish(uri: str, model: str, version: str, card_dir: Path) -> str:
    """Log the card on the version's source run and link it from the version.

    The artifact goes to ``model_card/`` of the run that produced the version (the run the
    registry page links to); the version gets tag ``calotune.model_card`` (the artifact URI)
    and a line in its description with a link to the card in the MLflow UI; the search run
    (the source run's parent) gets the same tag. Returns the artifact URI of the HTML card.
    """
    from calotune.tracking.mlflow_tracker import PARENT_TAG, _client, redact, store_errors

    client = _client(uri)
    with store_errors(f"writing the model card of {model!r} v{version} to {redact(uri)}"):
        mv = client.get_model_version(model, version)
        run = client.get_run(mv.run_id)
        client.log_artifacts(mv.run_id, str(card_dir), ARTIFACT_DIR)
        artifact = f"{ARTIFACT_DIR}/{HTML_NAME}"
        card_uri = f"{run.info.artifact_uri.rstrip('/')}/{artifact}"
        for key, value in ((TAG_MODEL_CARD, card_uri), (TAG_MODEL_CARD_RUN, mv.run_id),
                           (TAG_MODEL_CARD_PATH, artifact)):
            client.set_model_version_tag(model, version, key, value)
        link = (f"[Model card](#/experiments/{run.info.experiment_id}/runs/{mv.run_id}/artifacts/{artifact}) "
                f"(`{artifact}` of run {mv.run_id}; PDF beside it)")
        kept = [line for line in (mv.description or "").splitlines() if not line.startswith("[Model card](")]
        client.update_model_version(model, version, description="\n".join([link, *kept]).strip())
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            client.set_tag(parent, TAG_MODEL_CARD, card_uri)
            client.set_tag(parent, TAG_MODEL_CARD_RUN, mv.run_id)
    return card_uri
