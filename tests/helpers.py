"""Shared helpers for tests that drive calotune's command line for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m <args>`` in ``cwd``; returns the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def mlflow_client(home: Path):
    """A client on the SQLite store a search made under ``home`` (the --home folder)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def trial_runs(home: Path, experiment: str) -> list:
    """Nested trial runs of every search of ``experiment``."""
    client = mlflow_client(home)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]


def registered_name(space: str) -> str:
    """The registered model a search of ``space`` registers under (one per geometry)."""
    from calotune.detectors import get_detector
    from calotune.spec import load_spec
    from calotune.tracking.registry import registered_model_name

    spec = load_spec(space)
    return registered_model_name(spec.detector, get_detector(spec.detector, **spec.geometry).geometry_dict(),
                                 get_detector(spec.detector).geometry_dict())
