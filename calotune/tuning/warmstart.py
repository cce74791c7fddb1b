"""Warm starts: seed a new search with the configurations and scores of earlier ones.

``python -m calotune.search SPACE --warm-start [SOURCE]`` gives Optuna a history before
its first trial, so that TPE models the space from trial 1 instead of sampling its first
ten trials at random, and the first trial evaluated is the configuration in production.

Sources (:func:`plan_warm_start`), read from the tracking store before anything is written:

- bare ``--warm-start`` (or ``--warm-start auto``): the production model of the detector
  (geometry) the space targets, ``models:/NAME@production``, plus every *finished*
  search of the same family on the same detector geometry in the store (each search
  records its geometry's model name as param ``registered_model``; an older record
  without it counts when it registered a model of that name). Searches on a registered
  model (``base_model``) and searches from scratch do not seed each other;
- a search name (``zdc_swiglu-20261202-073303-a1b2``): that search's trials;
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: that model's configuration (the
  first trial) and the trials of the search that produced it;
- several of these, separated by commas.

A source of another family or detector, one that is missing, or sources that leave
nothing to seed are refused (:class:`~calotune.errors.UserError` naming ``--warm-start``).

Each earlier trial is mapped onto the new space (:func:`map_config`):

- a parameter the new space does not have (or that is inactive under the new space's
  conditionals) is dropped; one the new space adds is filled with the new baseline value
  (the space's ``default`` or the family's Config default, as the baseline trial);
- a number outside the new range is *clipped* to the bound if it lies at most
  :data:`CLIP_TOLERANCE` of the range's width beyond it (measured in log space for log
  ranges), and snapped to the step grid; farther out, the whole trial is *refused*: its
  score describes a configuration the new space cannot express, and attaching it to the
  bound would tell TPE something false about the bound;
- a categorical value that is not among the new choices refuses the trial.

Scores: a trial that ran the new search's full epoch budget (or more) and completed is an
Optuna ``COMPLETE`` trial with its objective value(s); one stopped early (ASHA, a
shorter earlier budget) is ``PRUNED`` with its last value as the intermediate value at
the epoch it reached, which is how TPE ranks pruned trials (below every complete one,
later epochs first). Several objectives: complete trials only (Optuna ranks pruned
trials on one objective). Failed and interrupted trials, and trials without the new
search's objective(s), are not seeded.

Why ``study.add_trials`` and not Ray's ``evaluated_rewards``: calotune's space is
define-by-run (conditional parameters), which Ray's ``OptunaSearch`` refuses with
``evaluated_rewards``, and those take one number per point (no pruned trials, no second
objective). :class:`calotune.tuning.runner.FailAwareOptunaSearch` adds the seeded trials
to its study right after creating it; Ray Tune pickles the study with the searcher, so a
resumed search keeps its history without reading the store again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: Bare ``--warm-start``: the production model and the finished searches of the family.
AUTO = "auto"
#: MLflow tag of the new search's parent run: the sources it was seeded from.
TAG = "calotune.warm_start_from"
#: MLflow params of the search run: the flag as given (the resume check) and the count.
PARAM = "warm_start"
COUNT_PARAM = "warm_start_trials"
#: MLflow param of every search run: the registered model name of its detector geometry
#: (``zdc``, ``zdc-g1a2b3c4d``): scores of another geometry are not comparable.
MODEL_PARAM = "registered_model"
#: How far beyond a bound (fraction of the range's width) a value is still clipped.
CLIP_TOLERANCE = 0.25
FLAG = "--warm-start"


@dataclass(frozen=True)
class PriorTrial:
    """One earlier trial as read from the store: MLflow params are strings."""

    source: str
    run_id: str
    params: dict[str, str]
    state: str  # calotune.state: complete | pruned | failed | interrupted | running
    values: dict[str, float]  # objective metric -> value (absent when not recorded)
    epochs: int


@dataclass
class Mapped:
    """An earlier configuration as a point of the new space, and what the mapping changed."""

    values: dict[str, Any] | None  # None: refused
    dropped: list[str] = field(default_factory=list)  # not in (or inactive in) the new space
    filled: list[str] = field(default_factory=list)  # new in the space: baseline value
    clipped: list[str] = field(default_factory=list)  # moved onto the range or step grid
    refused: str = ""  # why the trial cannot be seeded


@dataclass(frozen=True)
class SeedTrial:
    """A trial to add to the new study (plain data: built into an Optuna trial by
    :func:`frozen_trials`, where the space's distributions are known)."""

    params: dict[str, Any]
    state: str  # "complete" | "pruned"
    values: tuple[float, ...]
    step: int
    source: str


@dataclass(frozen=True)
class WarmStart:
    """What a warm-started search seeds: the first point to evaluate and the history."""

    flag: str  # as given: auto, a search name, a models:/ URI (comma-separated)
    sources: tuple[str, ...]  # resolved labels: models:/zdc/3, search zdc_swiglu-...
    first: dict[str, Any] | None  # the production (or named model's, or best) configuration
    trials: tuple[SeedTrial, ...]


# --- mapping ---------------------------------------------------------------------------
def _parse(p: Any, text: str) -> tuple[Any, str]:
    """A recorded (string) value as a value of parameter ``p``; ("", reason) if it is none."""
    if p.type == "categorical":
        for choice in p.choices:
            if str(choice) == text:
                return choice, ""
        return None, f"{p.name}={text} is not one of the choices {list(p.choices)}"
    try:
        number = float(text)
    except ValueError:
        return None, f"{p.name}={text!r} is not a number"
    if not math.isfinite(number):
        return None, f"{p.name}={text} is not finite"
    return number, ""


def _fit(p: Any, value: float) -> tuple[Any, bool, str]:
    """(value on ``p``'s domain, whether it moved, refusal reason)."""
    low, high = float(p.low), float(p.high)
    if p.log:
        if value <= 0:
            return None, False, f"{p.name}={value:g} is not positive (log range [{low:g}, {high:g}])"
        lo, hi, x = math.log(low), math.log(high), math.log(value)
    else:
        lo, hi, x = low, high, value
    beyond = max(lo - x, x - hi, 0.0)
    if beyond > 0 and beyond > CLIP_TOLERANCE * (hi - lo):
        return None, False, (f"{p.name}={value:g} lies outside [{low:g}, {high:g}] by more than "
                             f"{CLIP_TOLERANCE:g} of the range's width")
    fitted = p.project(value)
    moved = not math.isclose(float(fitted), value, rel_tol=1e-12, abs_tol=1e-12)
    return fitted, moved, ""


def map_config(recorded: dict[str, str], params: tuple, baseline: dict[str, Any]) -> Mapped:
    """Map an earlier trial's recorded parameters onto the new space's ``params``.

    ``baseline`` is the new search's baseline trial (the value a new parameter takes).
    Parameters are visited in the space's order, so a conditional parameter is kept only
    where the new space's parents (as mapped) activate it.
    """
    out = Mapped(values={})
    values: dict[str, Any] = {}
    for p in params:
        if not p.active(values):
            continue
        if p.name not in recorded:
            values[p.name] = baseline.get(p.name, p.project(p.default))
            out.filled.append(p.name)
            continue
        value, reason = _parse(p, recorded[p.name])
        if reason:
            return Mapped(values=None, refused=reason)
        if p.type != "categorical":
            value, moved, reason = _fit(p, value)
            if reason:
                return Mapped(values=None, refused=reason)
            if moved:
                out.clipped.append(p.name)
        values[p.name] = value
    out.values = values
    out.dropped = sorted(k for k in recorded if k not in values)
    return out


# --- reading the store -----------------------------------------------------------------
def _metric_names(spec: Any) -> tuple[str, ...]:
    return tuple(o.metric for o in spec.objectives)


def _trials_of(client: Any, search_run: Any, label: str, metrics: tuple[str, ...]) -> list[PriorTrial]:
    """The trial runs of a search's parent run."""
    runs = client.search_runs(
        [search_run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{search_run.info.run_id}' and tags.`calotune.kind` = 'trial'",
        max_results=10_000,
    )
    return [_prior(r, label, metrics) for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))]


def _prior(run: Any, label: str, metrics: tuple[str, ...]) -> PriorTrial:
    data = run.data
    values = {m: float(data.metrics[m]) for m in metrics
              if m in data.metrics and math.isfinite(float(data.metrics[m]))}
    return PriorTrial(source=label, run_id=run.info.run_id, params=dict(data.params),
                      state=data.tags.get("calotune.state", ""), values=values,
                      epochs=int(data.metrics.get("training_iteration", 0)))


def _searches(client: Any, filter_string: str) -> list:
    """Parent runs of searches matching ``filter_string`` across every active experiment."""
    ids = [e.experiment_id for e in client.search_experiments(max_results=10_000)]
    found: list = []
    for i in range(0, len(ids), 100):
        found += client.search_runs(ids[i:i + 100],
                                    filter_string=f"tags.`calotune.kind` = 'search' and {filter_string}",
                                    max_results=10_000)
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def model_name(spec: Any, detector: Any) -> str:
    """The registered model name of the space's detector geometry (``zdc``, ``zdc-g...``)."""
    from calotune.detectors import get_detector
    from calotune.tracking.registry import registered_model_name

    return registered_model_name(spec.detector, detector.geometry_dict(),
                                 get_detector(spec.detector).geometry_dict())


def _geometry_of(run: Any) -> str | None:
    """The registered model name (geometry) a search ran on, if its record says."""
    if MODEL_PARAM in run.data.params:
        return run.data.params[MODEL_PARAM]
    registered = run.data.tags.get("calotune.registered")  # NAME/VERSION of older records
    return registered.rsplit("/", 1)[0] if registered else None


def _check_search(run: Any, spec: Any, what: str, geometry: str) -> None:
    """A named source must be a search of the same family on the same detector geometry."""
    params = run.data.params
    if params.get("family") != spec.family or params.get("detector") != spec.detector:
        raise UserError(f"{FLAG} {what}: is a search of family {params.get('family')!r} on detector "
                        f"{params.get('detector')!r}, but {spec.source} searches {spec.family!r} on "
                        f"{spec.detector!r}; name a search or model of the same family and detector")
    theirs = _geometry_of(run)
    if theirs is not None and theirs != geometry:
        raise UserError(f"{FLAG} {what}: ran on the detector geometry of registered model {theirs!r}, but "
                        f"{spec.source} uses that of {geometry!r}; scores of other cells are not comparable. "
                        f"Name a search or model of the same geometry")
    if ("parent_model" in params) != (spec.base_model is not None):
        theirs = "searched on a registered model" if "parent_model" in params else "trained from scratch"
        ours = "searches on one" if spec.base_model else "trains from scratch"
        raise UserError(f"{FLAG} {what}: {theirs}, but {spec.source} {ours}; "
                        f"its scores do not describe this space's trials. Name another source")


def _model(client: Any, uri: str, tracking_uri: str, spec: Any, required: bool,
           geometry: str) -> tuple[str, Any, Any] | None:
    """(label, trial run, search run) of a registered model version; None when not
    ``required`` and the model or alias does not exist, or is not of this space's kind."""
    from calotune.tracking import registry

    try:
        name, alias, version = registry.parse_model_uri(uri)
        ref = registry.resolve(tracking_uri, name, alias=alias, version=version, required=required)
    except UserError as exc:
        if required:
            raise UserError(f"{FLAG} {uri}: {exc}; name an existing model, a search, or pass the "
                            f"bare flag") from None
        return None
    if ref is None:
        return None
    label = f"models:/{ref.name}/{ref.version}"
    run_id = client.get_model_version(ref.name, ref.version).run_id
    try:
        trial_run = client.get_run(run_id)
        search_run = client.get_run(trial_run.data.tags["mlflow.parentRunId"])
    except Exception:  # run deleted, or not a calotune trial run
        if required:
            raise UserError(f"{FLAG} {uri}: its run {run_id} (or that run's search) is gone from the store, "
                            f"so its configuration is unknown; name another source") from None
        log.warning("%s %s: its run %s is gone from the store; not used", FLAG, label, run_id)
        return None
    try:
        _check_search(search_run, spec, uri, geometry)
    except UserError as exc:
        if required:
            raise
        log.info("%s: %s is not used: %s", FLAG, label, str(exc).split(": ", 1)[-1])
        return None
    return label, trial_run, search_run


def _sources(flag: str, spec: Any, client: Any, tracking_uri: str, registered_name: str
             ) -> tuple[list[str], PriorTrial | None, list[PriorTrial]]:
    """(labels, the first configuration's trial, every earlier trial) of the flag's sources."""
    metrics = _metric_names(spec)
    labels: list[str] = []
    first: PriorTrial | None = None
    history: list[PriorTrial] = []
    seen_searches: set[str] = set()

    def add_search(run: Any, label: str) -> None:
        if run.info.run_id in seen_searches:
            return
        seen_searches.add(run.info.run_id)
        history.extend(_trials_of(client, run, label, metrics))

    items = [s.strip() for s in flag.split(",") if s.strip()]
    if not items:
        raise UserError(f"{FLAG} {flag!r}: empty; pass a search name, models:/NAME@ALIAS, or the bare "
                        f"flag for the production model and the earlier searches")
    for item in items:
        if item == AUTO:
            found = _model(client, f"models:/{registered_name}@production", tracking_uri, spec, False,
                           registered_name)
            if found is not None:
                label, trial_run, search_run = found
                labels.append(label)
                first = first or _prior(trial_run, label, metrics)
            for run in _searches(client, f"params.family = '{spec.family}' and params.detector = "
                                         f"'{spec.detector}' and tags.`calotune.state` = 'finished'"):
                if ("parent_model" in run.data.params) != (spec.base_model is not None):
                    continue
                if _geometry_of(run) != registered_name:  # another geometry, or unknown
                    continue
                label = f"search {run.data.tags.get('calotune.search', run.info.run_id)}"
                labels.append(label)
                add_search(run, label)
        elif item.startswith("models:/"):
            label, trial_run, search_run = _model(client, item, tracking_uri, spec, True,  # type: ignore[misc]
                                                  registered_name)
            labels.append(label)
            first = first or _prior(trial_run, label, metrics)
            add_search(search_run, f"search {search_run.data.tags.get('calotune.search', search_run.info.run_id)}")
        else:
            from calotune.tracking.mlflow_tracker import _quote

            runs = _searches(client, f"tags.`calotune.search` = '{_quote(item)}'")
            if not runs:
                raise UserError(f"{FLAG} {item}: no search of that name in the tracking store; pass a "
                                f"search name as the summary prints it (SPACE-YYYYmmdd-HHMMSS-xxxx), "
                                f"models:/NAME@ALIAS, or the bare flag")
            _check_search(runs[0], spec, item, registered_name)
            labels.append(f"search {item}")
            add_search(runs[0], f"search {item}")
    return list(dict.fromkeys(labels)), first, history


# --- from earlier trials to seeds ------------------------------------------------------
def _seed(prior: PriorTrial, mapped: Mapped, spec: Any) -> tuple[SeedTrial | None, str]:
    """The seed of a mapped trial, or (None, why it is not seeded)."""
    metrics = _metric_names(spec)
    if prior.state not in {"complete", "pruned"}:
        return None, prior.state or "unfinished"
    if any(m not in prior.values for m in metrics):
        return None, "no score"
    values = tuple(prior.values[m] for m in metrics)
    if prior.state == "complete" and prior.epochs >= spec.max_epochs:
        return SeedTrial(mapped.values or {}, "complete", values, prior.epochs, prior.source), ""
    if len(metrics) > 1:
        if prior.state == "complete":  # NSGA-II and TPE rank complete trials on every objective
            return SeedTrial(mapped.values or {}, "complete", values, prior.epochs, prior.source), ""
        return None, "pruned"
    return SeedTrial(mapped.values or {}, "pruned", values, max(prior.epochs, 1), prior.source), ""


def _best(seeds: list[SeedTrial], spec: Any) -> SeedTrial | None:
    """The best complete seed on the first objective (the first point without production)."""
    sign = 1.0 if spec.objective.mode == "min" else -1.0
    complete = [s for s in seeds if s.state == "complete"]
    return min(complete, key=lambda s: sign * s.values[0]) if complete else None


def _describe(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(counts.items()))


def build(flag: str, spec: Any, first: PriorTrial | None, history: list[PriorTrial],
          labels: list[str], baseline: dict[str, Any]) -> WarmStart:
    """Map every earlier trial onto ``spec``, log one line per source, and settle the seeds."""
    seeds: list[SeedTrial] = []
    by_source: dict[str, list[tuple[PriorTrial, Mapped, str]]] = {}
    seen_runs: set[str] = set()
    for prior in history:
        if prior.run_id in seen_runs:
            continue
        seen_runs.add(prior.run_id)
        mapped = map_config(prior.params, spec.params, baseline)
        why = mapped.refused
        seed = None
        if not why:
            seed, why = _seed(prior, mapped, spec)
        if seed is not None:
            seeds.append(seed)
        by_source.setdefault(prior.source, []).append((prior, mapped, why))
    for source, rows in by_source.items():
        kept = [m for _, m, why in rows if not why]
        refusals = [why.split("=")[0] if "=" in why else why for _, _, why in rows if why]
        log.info("warm start from %s: %d trial(s), %d seeded, %d not seeded%s; clipped: %s; parameters "
                 "dropped (not in this space): %s; filled from the baseline: %s", source, len(rows),
                 len(kept), len(refusals), f" ({_describe(refusals)})" if refusals else "",
                 _describe([n for m in kept for n in m.clipped]) or "none",
                 ", ".join(sorted({n for m in kept for n in m.dropped})) or "none",
                 ", ".join(sorted({n for m in kept for n in m.filled})) or "none")
        for _, _, why in rows:
            if why and "=" in why:
                log.debug("warm start from %s: not seeded: %s", source, why)
    point = None
    if first is not None:
        mapped = map_config(first.params, spec.params, baseline)
        if mapped.values is None:
            log.warning("warm start: the configuration of %s is not a point of %s (%s); the search does "
                        "not start from it", first.source, spec.source, mapped.refused)
        else:
            point = mapped.values
            log.info("warm start: the first trial is the configuration of %s%s", first.source,
                     f" (clipped: {', '.join(mapped.clipped)})" if mapped.clipped else "")
    if point is None:
        best = _best(seeds, spec)
        if best is not None:
            point = dict(best.params)
            log.info("warm start: the first trial is the best earlier configuration (%s, %s %.5g)",
                     best.source, spec.objective.metric, best.values[0])
    if point is None and not seeds:
        raise UserError(f"{FLAG} {flag}: none of the {len(seen_runs)} earlier trial(s) of "
                        f"{', '.join(labels) or 'the sources'} can seed {spec.source} (each was refused, "
                        f"unfinished or unscored; run with -v for the reasons); drop {FLAG} or name "
                        f"another source")
    return WarmStart(flag=flag, sources=tuple(labels), first=point, trials=tuple(seeds))


def plan_warm_start(flag: str, spec: Any, detector: Any, tracking_uri: str,
                    baseline: dict[str, Any]) -> WarmStart:
    """Resolve ``--warm-start`` against the store (read only) and map its trials onto ``spec``."""
    from calotune.tracking.mlflow_tracker import _client, redact, store_errors

    name = model_name(spec, detector)
    client = _client(tracking_uri)
    with store_errors(f"{FLAG}: reading {redact(tracking_uri)}"):
        labels, first, history = _sources(flag, spec, client, tracking_uri, name)
    if not labels:
        raise UserError(f"{FLAG}: nothing to start from in {redact(tracking_uri)}: no models:/{name}@production "
                        f"and no finished search of family {spec.family!r} on detector {spec.detector!r}; "
                        f"run a search first, name a search or model, or drop {FLAG}")
    return build(flag, spec, first, history, labels, baseline)


# --- into Optuna -----------------------------------------------------------------------
def distribution(p: Any) -> Any:
    """The Optuna distribution that ``Param.suggest`` asks for (they must be identical, or
    Optuna refuses a study whose trials disagree on a parameter's distribution)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.type == "float":
        return FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return CategoricalDistribution(list(p.choices))


def frozen_trials(spec: Any, seeds: tuple[SeedTrial, ...]) -> list:
    """Optuna trials of the seeds, over the new space's distributions."""
    from optuna.trial import TrialState, create_trial

    by_name = {p.name: p for p in spec.params}
    out = []
    for s in seeds:
        distributions = {k: distribution(by_name[k]) for k in s.params}
        attrs = {TAG: s.source}
        if s.state == "complete":
            kw: dict[str, Any] = {"values": list(s.values)} if len(s.values) > 1 else {"value": s.values[0]}
            out.append(create_trial(state=TrialState.COMPLETE, params=dict(s.params),
                                    distributions=distributions, user_attrs=attrs, **kw))
        else:
            out.append(create_trial(state=TrialState.PRUNED, params=dict(s.params), distributions=distributions,
                                    intermediate_values={s.step: s.values[0]}, user_attrs=attrs))
    return out


def points_to_evaluate(warm: WarmStart | None, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """The first trials: the warm start's configuration (production), then the baseline."""
    points = [] if warm is None or warm.first is None else [dict(warm.first)]
    if baseline not in points:
        points.append(baseline)
    return points


def record(warm: WarmStart) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of the search run that record the warm start."""
    return ({PARAM: warm.flag, COUNT_PARAM: str(len(warm.trials))},
            {TAG: ", ".join(warm.sources)[:5000]})
