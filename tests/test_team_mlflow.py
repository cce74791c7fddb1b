"""A team MLflow for real: PostgreSQL backend store, ``mlflow server`` with served artifacts.

The server is started with the jobs/mlflow-server recipe itself (``init_db.py`` creates the
role and database, ``serve.sh`` runs the server), so this test is also the recipe's test.
A tiny search logs to it over HTTP, then promotion and generation read from it over HTTP.
Asserting on the PostgreSQL tables and the artifact folder (not only on MLflow's answers)
proves where the data went: runs in the database, files in the server's artifact store,
nothing in the client's working directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.conftest import MlflowServer, Postgres, free_port, tool_env

pytestmark = pytest.mark.slow


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=tool_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def searched(team_mlflow: MlflowServer, tmp_path_factory: pytest.TempPathFactory,
             ) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("team-search")
    proc = _cli(["calotune.search", "zdc_swiglu", "--trials", "2", "--max-epochs", "1",
                 "--events", "400", "--seed", "5", "--tracking-uri", team_mlflow.uri], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work, proc


def test_search_logs_over_http_into_postgres(team_mlflow: MlflowServer, postgres: Postgres,
                                             searched: tuple[Path, subprocess.CompletedProcess]) -> None:
    work, proc = searched
    assert f"open {team_mlflow.uri} in a browser" in proc.stderr
    client = team_mlflow.client()
    exp = client.get_experiment_by_name("zdc_swiglu")
    # The server chose the artifact location: clients upload through it, never to a path.
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("calotune.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    assert {t.data.tags["calotune.state"] for t in trials} <= {"complete", "pruned"}
    for trial in trials:
        assert len(client.get_metric_history(trial.info.run_id, "mean_separation")) == 1
        assert trial.data.tags.get("calotune.node_id", "unknown") != "unknown"

    # ...and it really is PostgreSQL behind the server, holding all three runs.
    [(n_runs,)] = postgres.query(team_mlflow.database,
                                 "SELECT count(*) FROM runs WHERE experiment_id = %s",
                                 (int(exp.experiment_id),))
    assert n_runs == 3
    [(n_versions,)] = postgres.query(team_mlflow.database,
                                     "SELECT count(*) FROM model_versions WHERE name = 'zdc'")
    assert n_versions == 1

    version = client.get_model_version_by_alias("zdc", "candidate")
    assert version.run_id in {t.info.run_id for t in trials}
    assert version.source.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert "model/model.json" in listed and "model/weights.pt" in listed
    # The files are in the server's artifact store, and nowhere on the client side.
    stored = list(team_mlflow.artifacts.rglob("model.json"))
    assert any(version.run_id in str(p) for p in stored), stored
    local = [p for p in ("mlruns", "mlartifacts", ".calotune/artifacts") if (work / p).exists()]
    assert not local, f"the client wrote a local artifact store {local}; artifacts belong on the server"


def test_promote_and_generate_over_http(team_mlflow: MlflowServer,
                                        searched: tuple[Path, subprocess.CompletedProcess],
                                        tmp_path: Path) -> None:
    work, _ = searched
    promote = _cli(["calotune.promote", "zdc", "--tracking-uri", team_mlflow.uri], cwd=work)
    assert promote.returncode == 0, promote.stderr[-3000:]
    client = team_mlflow.client()
    candidate = client.get_model_version_by_alias("zdc", "candidate")
    production = client.get_model_version_by_alias("zdc", "production")
    assert production.version == candidate.version
    # this module's server is fresh: the first promotion has nothing to beat
    assert production.tags["promotion"] == "first"
    assert production.tags["replaced_version"] == "none"

    out = tmp_path / "gen.h5"
    gen = _cli(["calotune.generate", "models:/zdc@production", "--events", "40", "--out", str(out),
                "--tracking-uri", team_mlflow.uri], cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    with h5py.File(out) as f:
        assert f["incident_energies"].shape == (40, 1)
        assert f["ecal"].shape[0] == f["hcal"].shape[0] == 40
        assert (f["hcal"][:] >= 0).all() and f["hcal"][:].sum() > 0


def test_server_log_never_shows_the_database_password(team_mlflow: MlflowServer) -> None:
    log = team_mlflow.log.read_text(errors="replace")
    assert "mlflow server: backend postgresql+psycopg2://***@" in log, log[-2000:]
    assert team_mlflow.password not in log


def test_unreachable_server_is_a_one_line_error(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _cli(["calotune.search", "zdc_swiglu", "--trials", "1", "--tracking-uri", dead],
                cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unreachable" in proc.stderr and "jobs/mlflow-server" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".calotune").exists(), "bad input must write nothing"
