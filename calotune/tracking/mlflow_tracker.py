"""MLflow behind a small interface: a parent run per search, nested runs per trial, registry.

It knows nothing of Ray or of any model: callers hand it names, dicts and directories.
Runs are found again by tags (``calotune.search``, ``calotune.trial_id``) rather than by
timestamps, so a resumed search re-attaches to the runs it started instead of duplicating.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from calotune.errors import UserError

log = logging.getLogger(__name__)

TAG_SEARCH = "calotune.search"
TAG_TRIAL = "calotune.trial_id"
TAG_STATE = "calotune.state"
TAG_KIND = "calotune.kind"
PARENT_TAG = "mlflow.parentRunId"
_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}


def default_tracking_uri(root: Path) -> str:
    """SQLite in the project-local ``.calotune`` folder (MLflow's file store is deprecated)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def resolve_tracking_uri(flag: str | None, home: Path, *, must_exist: bool) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else SQLite in ``home``; checked first.

    ``must_exist``: commands that read a store (promote, generate) refuse to create an
    empty local one, so a mistyped --home gives a clear message, not "no such model".
    """
    explicit = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        check_tracking_uri(explicit)
        return explicit
    if must_exist and not (home / "mlflow.db").is_file():
        raise UserError(f"no MLflow store at {home / 'mlflow.db'}; run a search first, or pass "
                        f"--tracking-uri (or --home) to point at the one you use")
    return default_tracking_uri(home)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_tracking_uri(uri: str) -> None:
    """Fail fast, before anything is written, if the tracking store cannot be reached."""
    scheme = urlparse(uri).scheme
    if scheme in {"http", "https"}:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            raise UserError(
                f"--tracking-uri {uri}: the MLflow server is unreachable ({exc}); start it "
                f"(see jobs/mlflow-server) or omit --tracking-uri to use the local SQLite store"
            ) from None
    elif scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise UserError(
                f"--tracking-uri {uri}: folder {db.parent} does not exist; create it or pick another"
            )
    elif scheme not in {"postgresql", "mysql", "databricks", "file", ""}:
        raise UserError(f"--tracking-uri {uri}: unsupported scheme {scheme!r}")


class Tracker:
    """One search's view of an MLflow tracking store."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.client = _client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if artifact_root is not None and urlparse(uri).scheme == "sqlite":
                location = (artifact_root / experiment).resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}

    # --- search (parent) run -------------------------------------------------------
    def start_search(self, search: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the parent run, or re-open it when a search with this name exists."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_SEARCH}` = '{search}' and tags.`{TAG_KIND}` = 'search'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.parent_run_id = run_id
            self.refresh()
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=search,
                tags={TAG_SEARCH: search, TAG_KIND: "search", "mlflow.user": getpass.getuser(),
                      **tags},
            )
            run_id = run.info.run_id
            self.log_params(run_id, params)
        self.parent_run_id = run_id
        return run_id

    def refresh(self) -> dict[str, str]:
        """Re-read the trial runs of this search (another process may have created them)."""
        for run in self._children():
            trial_id = run.data.tags.get(TAG_TRIAL)
            if trial_id:
                self._trial_runs[trial_id] = run.info.run_id
        return dict(self._trial_runs)

    def _children(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=10_000,
        )

    def close_lost(self, known_trials: set[str]) -> list[str]:
        """End runs of trials that Tune no longer knows (started after its last snapshot).

        A driver killed between a trial's start and Tune's next experiment snapshot leaves
        an MLflow run that the restored search cannot continue; it re-runs that budget as a
        new trial, so the old run is closed as interrupted rather than left RUNNING.
        """
        lost = []
        for trial_id, run_id in self.refresh().items():
            if trial_id in known_trials:
                continue
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                self.client.set_tag(run_id, "calotune.interrupted", "true")
                self.end_trial(trial_id, "interrupted", reason="the driver was killed before Ray Tune "
                               "recorded this trial; the resumed search re-ran its budget as a new trial")
                lost.append(trial_id)
            elif run.data.tags.get("calotune.orphaned") != "true":
                # Finished, but after Tune's last snapshot: the record stays, marked, and the
                # search (which re-ran that budget) no longer counts or selects it.
                self.client.set_tag(run_id, "calotune.orphaned", "true")
                lost.append(trial_id)
        return lost

    def mark_interrupted(self) -> int:
        """Tag trial runs left RUNNING by a killed driver; the resumed search continues them."""
        n = 0
        for run in self._children():
            if run.info.status == "RUNNING" and run.data.tags.get(TAG_STATE) == "running":
                self.client.set_tag(run.info.run_id, "calotune.interrupted", "true")
                self.client.set_tag(run.info.run_id, TAG_STATE, "interrupted")
                n += 1
        return n

    def end_search(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        if self.parent_run_id is None:
            return
        if metrics:
            self.log_metrics(self.parent_run_id, metrics)
        self.client.set_terminated(self.parent_run_id, status=status)

    # --- trials -------------------------------------------------------------------
    def trial_run(self, trial_id: str, params: dict[str, Any]) -> str:
        """The nested run of a trial, created on first sight, found again on resume."""
        if trial_id in self._trial_runs:
            return self._trial_runs[trial_id]
        self.refresh()  # another tracker (the driver's, a previous session's) may have made it
        if trial_id in self._trial_runs:
            return self._trial_runs[trial_id]
        assert self.parent_run_id is not None, "start_search first"
        run = self.client.create_run(
            self.experiment_id, run_name=trial_id,
            tags={PARENT_TAG: self.parent_run_id, TAG_TRIAL: trial_id, TAG_KIND: "trial",
                  TAG_STATE: "running"},
        )
        self._trial_runs[trial_id] = run.info.run_id
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def end_trial(self, trial_id: str, state: str, reason: str | None = None) -> None:
        """Record the final state (complete / pruned / failed / interrupted) of a trial."""
        run_id = self._trial_runs.get(trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG_STATE, state)
        if reason:
            self.client.set_tag(run_id, "calotune.failure_reason", reason[:4900])
        self.client.set_terminated(run_id, status=_STATUS[state])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
                 if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    # --- registry -----------------------------------------------------------------
    def register(self, run_id: str, artifact_path: str, name: str, alias: str,
                 tags: dict[str, Any]) -> str:
        """A new version of registered model ``name`` from a run's artifacts, with an alias."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(
            name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        )
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)


def user() -> str:
    """Who did it, for provenance tags."""
    return os.environ.get("USER") or getpass.getuser()
