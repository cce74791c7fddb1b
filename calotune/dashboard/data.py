"""Read-only access to a calotune MLflow tracking store, shaped for the dashboard's pages.

Everything here reads: no run, tag, metric or registry entry is ever written, so the
dashboard can watch a search while it runs (SQLite allows readers beside the one writer)
and can be pointed at a team's tracking server without risk. The store is found the way
every calotune command finds it (``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, else
``<home>/mlflow.db``), and it must already exist.

Records are plain dataclasses so that the pages and the tests do not depend on MLflow's
entity classes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calotune.tracking.mlflow_tracker import PARENT_TAG, TAG_KIND, TAG_SEARCH, TAG_STATE, TAG_TRIAL, redact

log = logging.getLogger(__name__)

#: Registered models calotune uses as locks, not models (see ``registry_mutex``).
_LOCK_SUFFIXES = (".promotion-lock", ".search-lock")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: Artifacts the dashboard serves: the plots the search logs (and a model card, if any).
_SERVABLE = re.compile(r"^(plots/[A-Za-z0-9_.\-]+\.png|model_card/[A-Za-z0-9_.\-]+\.(html|pdf|md|json))$")
#: Version tags written by ``calotune.promote`` (one promotion's record per version).
PROMOTION_KEYS = ("promoted_at", "promoted_by", "promotion", "promotion_objective", "candidate_score",
                  "production_score", "replaced_version", "promotion_data_split")
MODEL_CARD_TAG = "calotune.model_card"


@dataclass
class Trial:
    """One trial run: its state, parameters and scores as the store holds them now."""

    trial_id: str
    run_id: str
    state: str  # running / complete / pruned / failed / interrupted
    reason: str | None  # why pruned or failed, when the family or the error said
    epochs: int  # epochs reported so far (the ASHA rung a pruned trial stopped at)
    params: dict[str, Any]
    metrics: dict[str, float]
    start_ms: int | None
    end_ms: int | None
    pareto: bool | None = None  # on the Pareto front (multi-objective searches only)
    orphaned: bool = False

    def objective(self, metric: str) -> float | None:
        """The final objective (written only when the trial ended complete or pruned)."""
        value = self.metrics.get(metric)
        return value if value is not None and math.isfinite(value) else None

    def latest(self, metric: str) -> float | None:
        """The final objective, else the last per-epoch value (``<metric>_epoch``) of a running trial."""
        value = self.objective(metric)
        if value is None:
            value = self.metrics.get(f"{metric}_epoch")
        return value if value is not None and math.isfinite(value) else None

    def state_text(self, scheduler: str = "asha") -> str:
        """The state as a user reads it: pruned at which rung, failed with which reason."""
        if self.state == "pruned":
            where = f"at the epoch-{self.epochs} rung" if scheduler != "none" else f"after epoch {self.epochs}"
            return f"pruned {where}" + (f": {self.reason}" if self.reason else "")
        if self.state == "failed":
            return f"failed: {self.reason.splitlines()[-1]}" if self.reason else "failed"
        if self.state == "running":
            return f"running (epoch {self.epochs})" if self.epochs else "running"
        return self.state


@dataclass
class Search:
    """One search (the parent run): its record, and its trials when loaded."""

    name: str
    run_id: str
    experiment: str
    experiment_id: str
    state: str  # running / finished / failed / interrupted / killed
    status: str  # MLflow run status
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    trials: list[Trial] = field(default_factory=list)

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """[(metric, mode)] in the order of the space (the first one ranks)."""
        out = []
        for item in self.params.get("objectives", "").split(","):
            metric, _, mode = item.partition(":")
            if metric:
                out.append((metric, mode or "min"))
        return out or [("mean_separation", "min")]

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]

    @property
    def registered(self) -> str | None:
        """``NAME/VERSION`` of the model this search registered, if any."""
        return self.tags.get("calotune.registered")

    @property
    def scheduler(self) -> str:
        return self.params.get("scheduler", "asha")

    def counts(self) -> dict[str, int]:
        """Trials per state."""
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def best(self, registered_trial: str | None = None) -> Trial | None:
        """The winner: the registered version's trial when there is one (for several
        objectives that is the ``select`` rule's choice), else the best final objective."""
        live = [t for t in self.trials if not t.orphaned]
        if registered_trial:
            for t in live:
                if t.trial_id == registered_trial:
                    return t
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [t for t in live if t.state == "complete" and t.objective(self.metric) is not None]
        scored = scored or [t for t in live if t.latest(self.metric) is not None]
        if not scored:
            return None
        return min(scored, key=lambda t: sign * float(t.latest(self.metric)))  # type: ignore[arg-type]

    def health_keys(self, limit: int = 4) -> list[str]:
        """The family's per-epoch health numbers (``health_*``: codebook usage, partition
        correlations, chain mixing), as the trials reported them."""
        return sorted({k for t in self.trials for k in t.metrics if k.startswith("health_")})[:limit]

    def held_out(self) -> list[Trial]:
        """Trials scored on the held-out test split after the search (the best and the default)."""
        return [t for t in self.trials if f"test_{self.metric}" in t.metrics]


@dataclass
class Version:
    """One registered model version, with its aliases and its promotion record."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    created_ms: int | None

    @property
    def promotion(self) -> dict[str, str]:
        return {k: self.tags[k] for k in PROMOTION_KEYS if k in self.tags}


@dataclass
class Model:
    name: str
    aliases: dict[str, str]  # alias -> version
    versions: list[Version]

    def history(self) -> list[Version]:
        """Versions that were ever promoted (or rolled back to), oldest promotion first."""
        return sorted((v for v in self.versions if "promoted_at" in v.tags), key=lambda v: v.tags["promoted_at"])


def parse_value(text: str) -> Any:
    """An MLflow param (always a string) back as the bool, int, float or string it was."""
    if text in {"True", "true"}:
        return True
    if text in {"False", "false"}:
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class Store:
    """The dashboard's read-only view of one tracking store."""

    def __init__(self, uri: str, cache_dir: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.label = redact(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="calotune-dashboard-"))
        self._cache_lock = threading.Lock()
        self._histories: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def check(self) -> None:
        """One read of each store (tracking and registry): a bad store fails here, at start."""
        self.client.search_experiments(max_results=1)
        self.client.search_registered_models(max_results=1)

    # --- searches -------------------------------------------------------------------
    def _experiments(self) -> dict[str, str]:
        return {e.experiment_id: e.name for e in self.client.search_experiments()}

    def searches(self) -> list[Search]:
        """Every search in the store, newest first (trials not loaded)."""
        experiments = self._experiments()
        if not experiments:
            return []
        runs = self.client.search_runs(list(experiments), filter_string=f"tags.`{TAG_KIND}` = 'search'",
                                       max_results=5000, order_by=["attributes.start_time DESC"])
        return [self._search(r, experiments) for r in runs]

    def search(self, name: str) -> Search | None:
        """One search by name, with its trials; None if the store has no such search."""
        if "'" in name or "`" in name:
            return None
        experiments = self._experiments()
        if not experiments:
            return None
        runs = self.client.search_runs(
            list(experiments), filter_string=f"tags.`{TAG_SEARCH}` = '{name}' and tags.`{TAG_KIND}` = 'search'",
            max_results=10)
        if not runs:
            return None
        found = self._search(runs[0], experiments)
        children = self.client.search_runs([found.experiment_id],
                                           filter_string=f"tags.`{PARENT_TAG}` = '{found.run_id}'",
                                           max_results=10_000)
        found.trials = sorted((self._trial(r) for r in children), key=lambda t: (t.start_ms or 0, t.trial_id))
        return found

    @staticmethod
    def _search(run: Any, experiments: dict[str, str]) -> Search:
        tags = dict(run.data.tags)
        status = run.info.status
        state = tags.get(TAG_STATE) or ("running" if status == "RUNNING" else status.lower())
        return Search(name=tags.get(TAG_SEARCH, run.info.run_name or run.info.run_id),
                      run_id=run.info.run_id, experiment=experiments.get(run.info.experiment_id, "?"),
                      experiment_id=run.info.experiment_id, state=state, status=status,
                      start_ms=run.info.start_time, end_ms=run.info.end_time, params=dict(run.data.params),
                      metrics=dict(run.data.metrics), tags=tags)

    @staticmethod
    def _trial(run: Any) -> Trial:
        tags = run.data.tags
        state = tags.get(TAG_STATE, "running")
        reason = tags.get("calotune.pruned_reason") if state == "pruned" else tags.get("calotune.failure_reason")
        metrics = dict(run.data.metrics)
        pareto = tags.get("calotune.pareto")
        return Trial(trial_id=tags.get(TAG_TRIAL, run.info.run_name or "?"), run_id=run.info.run_id,
                     state=state, reason=reason, epochs=int(metrics.get("training_iteration", 0)),
                     params={k: parse_value(v) for k, v in run.data.params.items()}, metrics=metrics,
                     start_ms=run.info.start_time, end_ms=run.info.end_time,
                     pareto=None if pareto is None else pareto == "true",
                     orphaned=tags.get("calotune.orphaned") == "true")

    def curves(self, search: Search, metric: str, *, key: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """Per trial, the per-epoch validation curve of ``metric`` as [(epoch, value)]; ``key``:
        another per-epoch metric by its full name (a family's ``health_*`` numbers)."""
        out = {}
        for t in search.trials:
            if key is not None and key not in t.metrics:
                continue
            name = key or f"{metric}_epoch"
            points = self._histories.get((t.run_id, name))
            if points is None:
                history = self.client.get_metric_history(t.run_id, name)
                points = sorted({m.step: m.value for m in history if math.isfinite(m.value)}.items())
                if t.state in {"complete", "pruned", "failed"}:  # final: its curve never changes again
                    # (an interrupted trial may be resumed, so its curve is read again)
                    self._histories[(t.run_id, name)] = points
            if points:
                out[t.trial_id] = points
        return out

    def plots(self, run_id: str) -> list[str]:
        """Artifact paths of the physics plots (``plots/*.png``) a trial's run holds."""
        try:
            return sorted(a.path for a in self.client.list_artifacts(run_id, "plots")
                          if not a.is_dir and a.path.endswith(".png"))
        except Exception as exc:  # artifacts moved or unreachable: the page says "no plots"
            log.warning("cannot list the plots of run %s: %s", run_id, exc)
            return []

    def pareto_front(self, search: Search) -> dict[str, Any] | None:
        """The search run's ``pareto_front.json`` (several objectives only), or None."""
        if len(search.objectives) < 2:
            return None
        path = self.artifact(search.run_id, "pareto_front.json", allow_any=True)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def artifact(self, run_id: str, path: str, *, allow_any: bool = False) -> Path | None:
        """A local copy of one artifact, or None if it is not one the dashboard serves.

        Only plots and model cards are served (``allow_any`` is for the dashboard's own
        reads): the route takes a run id and a path from the URL, so both are checked.
        Copies are cached: an artifact is written once and never changed.
        """
        if not _RUN_ID.match(run_id) or ".." in path or (not allow_any and not _SERVABLE.match(path)):
            return None
        target = self._cache / run_id / path
        with self._cache_lock:
            if target.is_file():
                return target
            import mlflow.artifacts

            try:
                with tempfile.TemporaryDirectory(dir=self._cache) as tmp:
                    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                                     dst_path=tmp, tracking_uri=self.uri))
                    if not local.is_file():
                        return None
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(local), target)
            except Exception as exc:  # missing or unreachable artifact: a 404, logged
                log.info("artifact %s of run %s not available: %s", path, run_id, exc)
                return None
        return target

    # --- registry ---------------------------------------------------------------------
    def models(self) -> list[Model]:
        """Registered models (calotune's lock entries left out), each with its versions."""
        out = []
        for rm in self.client.search_registered_models(max_results=1000):
            if rm.name.endswith(_LOCK_SUFFIXES):
                continue
            out.append(self.model(rm.name, rm))
        return sorted(out, key=lambda m: m.name)

    def model(self, name: str, rm: Any = None) -> Model | None:
        from mlflow.exceptions import MlflowException

        if "'" in name:
            return None
        try:
            rm = rm or self.client.get_registered_model(name)
        except MlflowException:
            return None
        versions = [Version(name=name, version=str(v.version), aliases=list(v.aliases or []), tags=dict(v.tags),
                            run_id=v.run_id, created_ms=v.creation_timestamp)
                    for v in self.client.search_model_versions(f"name = '{name}'", max_results=1000)]
        aliases = {str(a): str(v) for a, v in (rm.aliases or {}).items()}
        for v in versions:  # search_model_versions leaves aliases empty on some backends
            v.aliases = sorted({*v.aliases, *(a for a, num in aliases.items() if num == v.version)})
        versions.sort(key=lambda v: int(v.version) if v.version.isdigit() else 0, reverse=True)
        return Model(name=name, aliases=aliases, versions=versions)

    def close(self) -> None:
        shutil.rmtree(self._cache, ignore_errors=True)


_IMPORTANCES: dict[tuple, tuple[dict[str, float], str]] = {}


def importances(search: Search) -> tuple[dict[str, float], str]:
    """:func:`compute_importances`, cached on the complete trials and their scores: fANOVA
    takes seconds for a few hundred trials, and a page refreshed while the search runs
    would otherwise pay that on every change of any trial."""
    key = (search.run_id, search.metric, tuple(sorted((t.trial_id, t.objective(search.metric))
                                                      for t in search.trials if t.state == "complete")))
    if key not in _IMPORTANCES:
        if len(_IMPORTANCES) > 64:
            _IMPORTANCES.clear()
        _IMPORTANCES[key] = compute_importances(search)
    return _IMPORTANCES[key]


def compute_importances(search: Search) -> tuple[dict[str, float], str]:
    """Parameter importances of the search's first objective, and a note on how.

    Optuna's fANOVA evaluator (Hutter et al., ICML 2014) on an in-memory Optuna study
    rebuilt from the trial runs: complete trials with their parameters and final
    objective. Distributions are the range of the values seen (the store does not keep
    the space's bounds), which is what fANOVA's marginals are computed over anyway.
    Returns ({}, why) when there is too little to say anything.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = [t for t in search.trials if t.state == "complete" and t.objective(search.metric) is not None
            and not t.orphaned]
    names = sorted({k for t in done for k in t.params})
    varying = [k for k in names if len({repr(t.params.get(k)) for t in done}) > 1]
    if len(done) < 3 or not varying:
        return {}, (f"needs at least 3 complete trials whose parameters differ "
                    f"({len(done)} complete so far)")
    dists: dict[str, Any] = {}
    for k in varying:
        values = [t.params[k] for t in done if k in t.params]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and min(values) < max(values):
            dists[k] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            dists[k] = CategoricalDistribution(sorted({repr(v) for v in values}))
    trials = []
    for t in done:
        params = {}
        for k, dist in dists.items():
            if k not in t.params:
                continue  # a conditional parameter this trial did not have
            v = t.params[k]
            params[k] = float(v) if isinstance(dist, FloatDistribution) else repr(v)
        trials.append(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                value=float(t.objective(search.metric))))  # type: ignore[arg-type]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if search.mode == "min" else "maximize")
    study.add_trials(trials)
    try:
        result = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:
        return {}, f"Optuna could not compute importances: {exc}"
    return {k: float(v) for k, v in result.items()}, f"fANOVA over {len(done)} complete trials"
