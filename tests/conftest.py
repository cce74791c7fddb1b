"""Shared fixtures: real services on loopback for the slow cluster and team-MLflow tests.

Everything is a real process (PostgreSQL, ``mlflow server`` started through the
jobs/mlflow-server recipe, ``ray start`` nodes) bound to 127.0.0.1 on free ports, with
private temporary folders. Teardown stops exactly the processes these fixtures started,
by process id and process group (and, for Ray, by the private temp dir that every Ray
process of the cluster names on its command line), never by name: ``ray stop`` would
also stop any other Ray on the machine, a developer's or a parallel test's.

Skips: a missing PostgreSQL or ``ray[default]`` skips the tests that need it on a
developer machine, but fails them when ``CI=true``: CI must never pass by skipping
(``.ci/services.sh`` installs PostgreSQL, the ``test`` extra installs the rest).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Targets a developer may have exported; a test must never talk to their cluster or server.
_FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# --- helpers ------------------------------------------------------------------------
def in_ci() -> bool:
    """CI sets CI=true; there a missing service is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip on a developer machine, fail in CI, when a service the test needs is absent."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/services.sh and the test extra must provide it)")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port that is free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this venv's tools first on PATH, no inherited targets."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def tail(path: Path | None, chars: int = 4000) -> str:
    """The end of a log file, for assertion messages that explain a failure."""
    if path is None or not path.is_file():
        return ""
    return f"\n--- {path.name} (tail) ---\n" + path.read_text(errors="replace")[-chars:]


def wait_for(check: Callable[[], bool], timeout: float, what: str, *,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> float:
    """Poll ``check`` until true; fail early if ``proc`` died. Returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with status {proc.returncode}{tail(log)}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s{tail(log)}")
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` and the rest of its group."""
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Children that outlived the leader are still in its group (pgid == leader's pid).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a private temp path of ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
    return found


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def short_tmpdir(prefix: str) -> Path:
    """A private folder directly under /tmp: Ray's and PostgreSQL's unix sockets live in
    it, and pytest's own tmp paths can exceed the 107-byte socket path limit."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- PostgreSQL ---------------------------------------------------------------------
def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)


def postgres_bindir() -> Path | None:
    """Where initdb and postgres live: $CALOTUNE_PG_BINDIR, Debian's layout, or PATH."""
    candidates: list[Path] = []
    if os.environ.get("CALOTUNE_PG_BINDIR"):
        candidates.append(Path(os.environ["CALOTUNE_PG_BINDIR"]))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: _version_key(p.parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


@dataclass
class Postgres:
    """A throw-away PostgreSQL server on loopback, password authentication over TCP."""

    host: str
    port: int
    user: str
    password: str
    bindir: Path

    def uri(self, db: str, user: str | None = None, password: str | None = None) -> str:
        return f"postgresql://{user or self.user}:{password or self.password}@{self.host}:{self.port}/{db}"

    def libpq_env(self) -> dict[str, str]:
        """The administrator's connection as libpq environment variables."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password}

    def query(self, db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                                 password=self.password, dbname=db)) as conn:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        require(False, "running as root, and there is no 'postgres' account to run PostgreSQL as")
        raise AssertionError("unreachable") from None
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """initdb in a private folder and a postgres server on a free loopback port."""
    bindir = postgres_bindir()
    require(bindir is not None,
            "PostgreSQL server binaries (initdb, postgres) not found; run .ci/services.sh")
    assert bindir is not None
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        require(False, "psycopg2 is not installed (pip install -e '.[test]')")
    run_as = _run_as()
    root = short_tmpdir("ct-pg-")
    password = secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    if run_as:
        for path in (root, root / "pwfile"):
            os.chown(path, run_as["user"], run_as["group"])
    root.chmod(0o700)
    log = root / "postgres.log"
    proc: subprocess.Popen | None = None
    try:
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "calotune", "-E", "UTF8",
             "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}",
             "--no-sync", "--no-instructions"],
            capture_output=True, text=True, timeout=120, **run_as,
        )
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **run_as,
            )
        server = Postgres(host="127.0.0.1", port=port, user="calotune", password=password,
                          bindir=bindir)
        wait_for(lambda: server.query("postgres", "SELECT 1") == [(1,)], 60,
                 "PostgreSQL", proc=proc, log=log)
        yield server
    finally:
        if proc is not None:
            stop_group(proc, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


# --- MLflow tracking server (the jobs/mlflow-server recipe, for real) -------------------
@dataclass
class MlflowServer:
    """``jobs/mlflow-server/serve.sh`` on loopback over a PostgreSQL database of its own."""

    uri: str
    database: str
    password: str  # of the server's database role; the tests check it never leaks
    artifacts: Path
    log: Path
    startup_s: float

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=2) as response:
        return response.status == 200


@contextlib.contextmanager
def mlflow_server(postgres: Postgres, name: str, workdir: Path) -> Iterator[MlflowServer]:
    """A fresh database (made by init_db.py, as a team would) and serve.sh on a free port."""
    password = secrets.token_hex(12)
    role = database = f"mlflow_{name}"
    init = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "mlflow-server" / "init_db.py"), "--db", database,
         "--role", role],
        env=tool_env(**postgres.libpq_env(), MLFLOW_DB_PASSWORD=password),
        capture_output=True, text=True, timeout=60,
    )
    assert init.returncode == 0, f"init_db.py failed:\n{init.stdout}\n{init.stderr}"
    port = free_port()
    artifacts = workdir / "artifacts"
    log = workdir / "mlflow-server.log"
    env = tool_env(
        MLFLOW_BACKEND_STORE_URI=postgres.uri(database, role, password),
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
    )
    with log.open("ab") as out:
        proc = subprocess.Popen(["bash", str(REPO / "jobs" / "mlflow-server" / "serve.sh")],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        startup = wait_for(lambda: _healthy(uri), 240, "mlflow server (serve.sh)", proc=proc, log=log)
        yield MlflowServer(uri=uri, database=database, password=password, artifacts=artifacts,
                           log=log, startup_s=startup)
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def team_mlflow(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    """One MLflow server (and database) per test module, so modules never see each other's
    runs and registered versions."""
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with mlflow_server(postgres, name, tmp_path_factory.mktemp(f"mlflow-{name}")) as server:
        yield server


# --- a multi-node Ray cluster on loopback ---------------------------------------------
def ray_job_cli_available() -> bool:
    """`ray job submit` needs the dashboard's job server, which comes with ray[default]."""
    try:
        import aiohttp_cors  # noqa: F401  # the marker of ray[default]'s extras
        import ray.dashboard.modules.job.cli  # noqa: F401
    except ImportError:
        return False
    return shutil.which("ray", path=str(VENV_BIN)) is not None


@dataclass
class RayCluster:
    """``ray start --head`` plus ``ray start --address`` nodes, each in its own temp dir.

    Every node gets a custom resource naming its role (``head_node``, ``worker_node``):
    on one machine all nodes share an IP, so node ids and these resources tell them apart.
    """

    root: Path
    gcs_address: str
    dashboard_url: str
    token: str
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What a client (driver, `ray job submit`, `ray list`) needs to be let in."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                # nothing to drain on a test cluster; SIGTERM stops a node at once
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster's dashboard."""
        return subprocess.run([str(VENV_BIN / "ray"), *args, "--address", self.dashboard_url],
                              env=tool_env(**self.env), capture_output=True, text=True,
                              timeout=timeout)

    def state(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        """`ray list KIND --detail` as JSON (nodes, actors, jobs)."""
        args = ["list", kind, "--detail", "--format", "json", "--limit", "10000"]
        for f in filters:
            args += ["--filter", f]
        out = self.ray(*args)
        assert out.returncode == 0, f"ray list {kind} failed:\n{out.stdout}\n{out.stderr}"
        return json.loads(out.stdout)

    def alive_nodes(self) -> dict[str, str]:
        """node id -> role ('head_node' / 'worker_node') of every alive node."""
        roles = {}
        for node in self.state("nodes", "state=ALIVE"):
            resources = node.get("resources_total") or {}
            role = next((r for r in ("head_node", "worker_node") if r in resources), "unknown")
            roles[node["node_id"]] = role
        return roles

    def start_node(self, role: str, num_cpus: int, head: bool = False) -> subprocess.Popen:
        temp = self.root / f"n{len(self.procs)}"  # a node's own folder: nodes on one host
        temp.mkdir()                              # must not share runtime_resources/
        args = [str(VENV_BIN / "ray"), "start", "--block", f"--num-cpus={num_cpus}",
                f"--resources={json.dumps({role: 1})}", f"--temp-dir={temp}",
                f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
                "--object-store-memory=200000000"]
        if head:
            port = int(self.gcs_address.rsplit(":", 1)[1])
            dash = int(self.dashboard_url.rsplit(":", 1)[1])
            args += ["--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"]
        else:
            args += [f"--address={self.gcs_address}"]
        log = self.log_dir / f"ray-{role}-{len(self.procs)}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(args, env=tool_env(**self.env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait_nodes(self, n: int, timeout: float = 180) -> float:
        """Wait until ``n`` nodes are alive; fail early if the newest node's process died."""
        return wait_for(lambda: len(self.alive_nodes()) >= n, timeout, f"{n} Ray node(s)",
                        proc=self.procs[-1], log=self.logs[-1])

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head last
            stop_group(proc, timeout=40)
        # Anything still alive that names our private temp dir is ours (gcs, raylet, agents).
        kill_pids(pids_mentioning(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(log_dir: Path, workers: int = 1, cpus_per_node: int = 1) -> Iterator[RayCluster]:
    """A head and ``workers`` worker nodes on loopback, token-authenticated, torn down after."""
    require(ray_job_cli_available(),
            "the Ray job server needs ray[default] (pip install -e '.[test]')")
    cluster = RayCluster(root=short_tmpdir("ct-ray-"), gcs_address=f"127.0.0.1:{free_port()}",
                         dashboard_url=f"http://127.0.0.1:{free_port()}",
                         token=secrets.token_hex(32), log_dir=log_dir)
    try:
        cluster.start_node("head_node", cpus_per_node, head=True)
        cluster.wait_nodes(1)
        for _ in range(workers):
            cluster.start_node("worker_node", cpus_per_node)
        cluster.wait_nodes(1 + workers)
        yield cluster
    finally:
        cluster.stop()

