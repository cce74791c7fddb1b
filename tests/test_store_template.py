"""A new SQLite store starts as a copy of a migrated empty one, and is the same store."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from calotune.tracking import mlflow_tracker


def _schema(path: Path) -> tuple[list, list]:
    with sqlite3.connect(path) as db:
        tables = sorted(db.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index')"))
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, version


def test_seeded_store_equals_a_store_mlflow_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    template = mlflow_tracker._schema_template()
    assert template.is_file() and template.parent == tmp_path / "cache" / "calotune"
    assert mlflow_tracker._schema_template() == template  # made once, then reused
    seeded = tmp_path / "home" / "mlflow.db"
    seeded.parent.mkdir()
    client = mlflow_tracker._client(f"sqlite:///{seeded}")
    assert _schema(seeded) == _schema(template)
    default = client.get_experiment("0")
    assert default.artifact_location == os.path.abspath("mlruns/0")
    assert default.creation_time > 0 and not [p for p in seeded.parent.iterdir() if ".seed" in p.name]
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "a"))
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_existing_store_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    client = mlflow_tracker._client(f"sqlite:///{store}")
    client.create_experiment("kept", artifact_location=str(tmp_path / "a"))
    mlflow_tracker._OPENED.discard(f"sqlite:///{store}")
    mlflow_tracker._seed_new_store(f"sqlite:///{store}")
    assert mlflow_tracker._client(f"sqlite:///{store}").get_experiment_by_name("kept") is not None


def test_unusable_cache_falls_back_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache cannot be created under a file
    store = tmp_path / "mlflow.db"
    client = mlflow_tracker._client(f"sqlite:///{store}")
    assert client.get_experiment("0").name == "Default"
    assert not (blocker / "calotune").exists()
