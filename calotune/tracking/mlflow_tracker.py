"""MLflow behind a small interface: a parent run per search, nested runs per trial, registry.

It knows nothing of Ray or of any model: callers hand it names, dicts and directories.
Runs are found again by tags (``calotune.search``, ``calotune.trial_id``) rather than by
timestamps, so a resumed search re-attaches to the runs it started instead of duplicating.

Accepted tracking URIs (``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``), each checked by
:func:`check_tracking_uri` before anything is written:

- ``sqlite:////ABSOLUTE/PATH.db``: a SQLite file in an existing, writable folder. In-memory
  (``sqlite://``, ``sqlite:///:memory:``), relative, URI-mode and query-option forms are
  refused: they either vanish when the command ends or depend on the working directory.
- ``http(s)://HOST:PORT``: an MLflow tracking server; its ``/health`` must answer.
- ``postgresql[+DRIVER]://...`` and ``mysql[+DRIVER]://...``: the driver module that
  SQLAlchemy would import for that dialect must be installed, and the database must accept
  a connection.
- ``databricks`` / ``databricks://PROFILE``: passed through (credentials are MLflow's job).

Refused: ``file:`` URIs and bare paths (MLflow's file store). MLflow 3.17 still opens them,
but its registry creates registered models with a check-then-mkdir, which is not atomic,
so the promotion lock and the duplicate-search guard below would not hold; and the store
is deprecated upstream. Use a SQLite file instead.
"""

from __future__ import annotations

import getpass
import importlib.util
import logging
import math
import os
import random
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
#: Experiment tag that MLflow 3's UI reads to choose an experiment's default view; without
#: it the UI infers a kind and may open a calotune search on the GenAI (traces) tabs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the training view: runs, metrics, charts
_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}

ACCEPTED_URIS = ("sqlite:////ABSOLUTE/PATH/mlflow.db, http(s)://HOST:PORT (an MLflow server), "
                 "postgresql[+DRIVER]://USER@HOST/DB, mysql[+DRIVER]://USER@HOST/DB or databricks")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CONNECT_TIMEOUT_S = 15.0
# The pip package that provides each DB-API module SQLAlchemy may import.
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
                    "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
                    "mysql": "mysql-connector-python", "mariadb": "mariadb"}
# Installed-driver alternatives to suggest, per dialect: (URI scheme, module).
_ALTERNATIVES = {"postgresql": (("postgresql+psycopg2", "psycopg2"), ("postgresql+psycopg", "psycopg"),
                                ("postgresql+pg8000", "pg8000")),
                 "mysql": (("mysql+mysqldb", "MySQLdb"), ("mysql+pymysql", "pymysql"),
                           ("mysql+mysqlconnector", "mysql.connector"))}
# URIs whose store this process has opened once (schema created / verified under the lock).
_OPENED: set[str] = set()


# --- tracking URIs -----------------------------------------------------------------------
def default_tracking_uri(root: Path) -> str:
    """SQLite in the project-local ``.calotune`` folder (MLflow's file store is deprecated)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """``uri`` with any password replaced by ``***``: messages and tags must not leak it."""
    parsed = urlparse(uri)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
        return parsed._replace(netloc=netloc).geturl()
    return uri


def resolve_tracking_uri(flag: str | None, home: Path, *, must_exist: bool) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else SQLite in ``home``; checked first.

    ``must_exist``: commands that read a store (promote, generate) refuse to create an
    empty local one, so a mistyped --home or path gives a clear message, not "no such model".
    The message names where the URI came from, because a stale environment variable is a
    common cause and the user must know which of the two to fix.
    """
    if flag is not None:
        check_tracking_uri(flag, "--tracking-uri", must_exist=must_exist)
        return flag
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env is not None:
        check_tracking_uri(env, "MLFLOW_TRACKING_URI", must_exist=must_exist)
        return env
    db = home / "mlflow.db"
    label = f"--home {home}"
    if db.exists() or db.is_symlink():
        _check_sqlite_file(db, label, must_exist=must_exist)
    elif must_exist:
        raise UserError(f"no MLflow store at {db}; run a search first, or pass "
                        f"--tracking-uri (or --home) to point at the one you use")
    else:  # the search creates ``home``: its nearest existing ancestor must take a new folder
        existing = home
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{label}: {existing} is not a folder; pick another --home")
        _probe_writable(existing, label, "--home")
    return default_tracking_uri(home)


def check_tracking_uri(uri: str, source: str = "--tracking-uri", *, must_exist: bool = False) -> None:
    """Refuse, before anything is written, a store that cannot be opened or would not last.

    ``source`` is the flag or variable the URI came from (``--tracking-uri`` or
    ``MLFLOW_TRACKING_URI``), named in every message. ``must_exist``: a SQLite file must
    already be an MLflow store (commands that only read the registry).
    """
    label = (f"--tracking-uri {redact(uri)}" if source == "--tracking-uri"
             else f"{source}={redact(uri)} (from the environment)")
    fix = f"use {ACCEPTED_URIS}"
    try:
        _check_uri(uri, label, fix, must_exist=must_exist)
    except UserError as exc:
        if source == "--tracking-uri":
            raise
        raise UserError(f"{exc}; or unset {source} to use the local SQLite store") from None


def _check_uri(uri: str, label: str, fix: str, *, must_exist: bool) -> None:
    if not uri.strip():
        raise UserError(f"{label}: empty tracking URI; {fix}")
    scheme = urlparse(uri).scheme.lower()
    base, _, _driver = scheme.partition("+")
    if base == "sqlite":
        _check_sqlite_uri(uri, label, must_exist=must_exist)
    elif scheme in {"http", "https"}:
        _check_server(uri, label)
    elif base in {"postgresql", "mysql"}:
        _check_database(uri, label, base)
    elif scheme == "databricks":
        return
    elif scheme in {"", "file"} or len(scheme) == 1:  # a path, file:..., or C:\...
        path = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser()
        example = (path if path.is_absolute() else Path.cwd() / path).resolve()
        example = example / "mlflow.db" if example.is_dir() or not example.suffix else example
        raise UserError(
            f"{label}: a local folder (MLflow's file store) is not accepted: it is deprecated and "
            f"its registry cannot serialise concurrent promotions; use a SQLite file, e.g. "
            f"--tracking-uri sqlite:///{example}")
    elif scheme == "postgres":
        raise UserError(f"{label}: SQLAlchemy 2 does not know the scheme 'postgres'; write "
                        f"postgresql:// (or postgresql+psycopg2://)")
    else:
        raise UserError(f"{label}: unsupported scheme {scheme!r}; {fix}")


def _check_sqlite_uri(uri: str, label: str, *, must_exist: bool) -> None:
    """An absolute file path: the store must outlive the command and not depend on the cwd."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise UserError(f"{label}: not a valid SQLAlchemy URL ({exc}); write "
                        f"sqlite:////ABSOLUTE/PATH/mlflow.db") from None
    database = url.database or ""
    if database in {"", ":memory:"} or database.startswith("file:") or url.query.get("mode") == "memory":
        raise UserError(f"{label}: an in-memory SQLite database vanishes when the command exits, "
                        f"and everything recorded in it with it; use a file, e.g. "
                        f"sqlite:///{Path.cwd().resolve() / '.calotune' / 'mlflow.db'}")
    if url.query:
        raise UserError(f"{label}: SQLite URL options ({', '.join(sorted(url.query))}) are not "
                        f"supported; drop the '?...' part")
    path = Path(database)
    if url.host or not path.is_absolute():
        absolute = (Path.cwd() / (url.host or "") / path).resolve()
        raise UserError(f"{label}: the SQLite path {database!r} is relative, so the store would "
                        f"depend on the folder the command runs in; give an absolute path "
                        f"(four slashes), e.g. sqlite:///{absolute}")
    _check_sqlite_file(path, label, must_exist=must_exist)


def _check_sqlite_file(db: Path, label: str, *, must_exist: bool) -> None:
    """``db`` is a writable MLflow SQLite store, or can be created as one."""
    if db.exists():
        if db.is_dir():
            raise UserError(f"{label}: {db} is a folder, not a SQLite database file; point at a "
                            f"file, e.g. sqlite:///{db / 'mlflow.db'}")
        if not db.is_file():
            raise UserError(f"{label}: {db} is not a regular file; point at a SQLite database file")
        try:
            with db.open("r+b") as f:  # r+ checks write permission without changing anything
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise UserError(f"{label}: cannot open {db} for reading and writing ({exc.strerror}); "
                            f"fix its permissions or pick another file") from None
        if head and head != _SQLITE_MAGIC:
            raise UserError(f"{label}: {db} exists but is not a SQLite database (it starts with "
                            f"{head[:8]!r}); pick another file, or move this one away")
        if not head and must_exist:
            raise UserError(f"{label}: {db} is empty, not an MLflow store; run a search first, "
                            f"or point at the store you use")
        if head:
            tables = _sqlite_tables(db, label)
            if tables and "experiments" not in tables:
                raise UserError(f"{label}: {db} is a SQLite database but not an MLflow store (its "
                                f"tables: {', '.join(sorted(tables)[:6])}); pick another file")
            if must_exist and not tables:
                raise UserError(f"{label}: {db} holds no MLflow store yet; run a search first")
    elif must_exist:
        raise UserError(f"{label}: no MLflow store at {db}; run a search first, or point at the "
                        f"store you use")
    elif not db.parent.is_dir():
        raise UserError(f"{label}: folder {db.parent} does not exist; create it or pick another")
    _probe_writable(db.parent, label, "the folder")


def _sqlite_tables(db: Path, label: str) -> set[str]:
    """Table names, read without writing (``mode=ro``); UserError if SQLite cannot read it."""
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"{label}: {db} is not a readable SQLite database ({exc}); pick another "
                        f"file, or move this one away") from None
    return {name for (name,) in rows}


def _probe_writable(folder: Path, label: str, what: str) -> None:
    """Create and remove a file: SQLite writes its journal next to the database, and
    ``os.access`` is not reliable (root, read-only mounts, ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".calotune-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{label}: {what} {folder} is not writable ({exc.strerror}); fix its "
                        f"permissions or pick another folder") from None


def _check_server(uri: str, label: str) -> None:
    import urllib.error
    import urllib.request

    if not urlparse(uri).hostname:
        raise UserError(f"{label}: no host; write http://HOST:PORT")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise UserError(
            f"{label}: the MLflow server is unreachable ({exc}); start it "
            f"(see jobs/mlflow-server) or omit --tracking-uri to use the local SQLite store"
        ) from None


def _check_database(uri: str, label: str, base: str) -> None:
    """The DB-API module SQLAlchemy would import for this URL is installed, and it connects."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    installed = [scheme for scheme, module in _ALTERNATIVES[base] if _importable(module)]
    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise UserError(f"{label}: SQLAlchemy has no driver {url.drivername!r}; write "
                        f"{' or '.join(f'{s}://' for s in installed) or f'{base}://'}") from None
    except ArgumentError as exc:
        raise UserError(f"{label}: not a valid database URL ({exc})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or "?").split(".")[0]
        alt = f", or use an installed driver: {' or '.join(f'{s}://' for s in installed)}" if installed else ""
        raise UserError(f"{label}: {url.drivername}:// needs the Python driver {module!r}, which is "
                        f"not installed; pip install {_DRIVER_PACKAGES.get(module, module)}{alt}") from None
    error = _connect_error(url)
    if error:
        raise UserError(f"{label}: cannot connect to the database ({error}); check the host, port, "
                        f"credentials and database name, or omit the flag to use the local SQLite store")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _connect_error(url) -> str | None:
    """One connection attempt, bounded in time (some drivers wait minutes for a dead host)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    result: list[str | None] = []

    def attempt() -> None:
        try:
            engine = create_engine(url, poolclass=NullPool)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
            result.append(None)
        except Exception as exc:  # any failure here is the user's store
            orig = getattr(exc, "orig", None) or exc
            result.append(str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(_CONNECT_TIMEOUT_S)
    if not result:
        return f"no answer within {_CONNECT_TIMEOUT_S:.0f} s"
    return result[0]


# --- opening a store -------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextmanager
def store_errors(what: str, fix: str = "check the tracking URI and that the store is reachable"
                 ) -> Iterator[None]:
    """MLflow, database and I/O failures on a user's store become one UserError line.

    Only for calls whose every failure is the store's (unreachable, locked, missing,
    permissions): code bugs raise other types and still show a traceback.
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        raise UserError(f"{what}: {_first_line(exc)}; {fix}") from None


@contextmanager
def _first_open_lock(uri: str, what: str = "tracking store") -> Iterator[None]:
    """Serialise the first opening of a SQLite store across processes.

    MLflow creates the schema and runs its migrations when a process first opens an empty
    database; two processes doing that at once crash ("table ... already exists", alembic
    row mismatch). An OS lock on ``<db>.lock`` next to the database makes the second wait
    until the first has finished. (flock is advisory and per host; SQLite on network file
    systems is unsafe anyway, which is why clusters use a tracking server.)
    """
    if urlparse(uri).scheme.partition("+")[0].lower() != "sqlite":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    from sqlalchemy.engine import make_url

    lock_path = f"{make_url(uri).database}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{what} {redact(uri)}: cannot create the lock file {lock_path} "
                        f"({exc.strerror}); fix the folder's permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _schema_template() -> Path:
    """An empty, fully migrated SQLite store of the installed MLflow, made once per machine.

    Creating a store runs MLflow's ~60 schema migrations: 4-8 s on a 2-core machine, paid
    by every new ``--home`` (and by every test that makes one). Copying a migrated empty
    store is a file copy. Keyed by MLflow's version, so an upgrade makes a new one; built
    in a temporary file and renamed, so a reader never sees half a template.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "calotune"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{template.name}.{os.getpid()}.tmp"
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}", registry_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        os.replace(tmp, template)
    finally:
        tmp.unlink(missing_ok=True)
    return template


def _seed_new_store(uri: str) -> None:
    """Start a SQLite store that does not exist yet as a copy of :func:`_schema_template`.

    Called under :func:`_first_open_lock`. The copy is written beside the store and
    renamed into place, so it appears complete or not at all. The one row that differs
    from a freshly made store, MLflow's "Default" experiment, gets the artifact location
    and creation time a fresh store would have had. Any failure leaves the store to MLflow,
    which creates it the slow way.
    """
    from sqlalchemy.engine import make_url

    if urlparse(uri).scheme.partition("+")[0].lower() != "sqlite":
        return
    path = Path(make_url(uri).database or "")
    if not path.is_absolute() or path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        shutil.copyfile(_schema_template(), tmp)
        now = int(time.time() * 1000)
        with sqlite3.connect(tmp) as db:
            db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                       "WHERE experiment_id = 0", (os.path.abspath(os.path.join("mlruns", "0")), now, now))
        db.close()
        os.replace(tmp, path)
    except Exception as exc:  # any failure (disk, sqlite, MLflow): the slow way
        log.debug("no store template (%s); MLflow creates %s itself", exc, path)
    finally:
        tmp.unlink(missing_ok=True)


def _client(uri: str):
    """An MlflowClient on ``uri`` whose store is open: schema created or verified once per
    process under :func:`_first_open_lock`, failures as UserError."""
    from mlflow.tracking import MlflowClient

    if uri in _OPENED:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with _first_open_lock(uri), store_errors(f"tracking store {redact(uri)}"):
        _seed_new_store(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # may open the store already
        client.search_experiments(max_results=1)  # opens (migrates) the tracking store
        client.search_registered_models(max_results=1)  # and the registry store
    _OPENED.add(uri)
    return client


def _is_already_exists(exc: BaseException) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(exc, "error_code", ""))


@contextmanager
def registry_mutex(client, lock: str, *, what: str, timeout_s: float = 600.0, stale_s: float = 1800.0,
                   busy_hint: str = "") -> Iterator[None]:
    """A mutex across processes and machines: the registered model ``lock`` exists while held.

    MLflow has no compare-and-set, but creating a registered model is atomic in the
    SQLite, PostgreSQL, MySQL and server backends (the name is a unique key), so exactly
    one creator wins. A lock older than ``stale_s`` (its holder was killed) is broken.
    """
    from mlflow.exceptions import MlflowException

    holder = f"{user()}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        with store_errors(f"{what}: the lock {lock!r}"):
            try:
                client.create_registered_model(
                    lock, tags={"holder": holder, "since": f"{time.time():.3f}"},
                    description=f"held by calotune while it {what}")
                break
            except MlflowException as exc:
                if not _is_already_exists(exc):
                    raise
            try:
                current = client.get_registered_model(lock)
            except MlflowException as exc:
                if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
                    continue  # released between our two calls: try again at once
                raise
            if time.time() - float(current.tags.get("since", "0")) > stale_s:
                log.warning("breaking stale lock %r held by %s", lock, current.tags.get("holder"))
                try:
                    client.delete_registered_model(lock)
                except MlflowException as exc:
                    if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                        raise
                continue
        other = current.tags.get("holder", "?")
        if time.monotonic() > deadline:
            raise UserError(f"another process ({other}) holds {lock!r} while it {what}; try again"
                            f"{busy_hint}, or delete registered model {lock!r} if that process is gone")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except Exception as exc:  # never mask the body's outcome
            log.warning("could not release lock %r (%s); it is broken after %.0f s",
                        lock, _first_line(exc), stale_s)


class Tracker:
    """One search's view of an MLflow tracking store."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.experiment = experiment
        self.experiment_id = self._experiment(experiment, artifact_root)
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        """The experiment's id, created if needed; a concurrent creator is not an error."""
        from mlflow.exceptions import MlflowException

        with store_errors(f"tracking store {redact(self.uri)}: experiment {name!r}"):
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if artifact_root is not None and urlparse(self.uri).scheme == "sqlite":
                    location = (artifact_root / name).resolve().as_uri()
                try:
                    return str(self.client.create_experiment(name, artifact_location=location,
                                                             tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
                except MlflowException as exc:
                    if not _is_already_exists(exc):
                        raise
                exp = self.client.get_experiment_by_name(name)  # another process made it just now
                if exp is None:
                    raise UserError(f"tracking store {redact(self.uri)}: experiment {name!r} was "
                                    f"created and deleted meanwhile; run the command again")
            if exp.lifecycle_stage != "deleted" and EXPERIMENT_KIND_TAG not in exp.tags:
                # made by an older calotune: give it the training view too (a kind a user
                # chose in the UI is theirs and stays)
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if exp.lifecycle_stage == "deleted":
            raise UserError(
                f"tracking store {redact(self.uri)}: experiment {name!r} (id {exp.experiment_id}) was "
                f"deleted; restore it (mlflow experiments restore --experiment-id "
                f"{exp.experiment_id}) or remove it for good (mlflow gc)")
        return str(exp.experiment_id)

    # --- search (parent) run -------------------------------------------------------
    def _search_runs_named(self, search: str) -> list:
        return search_runs_named(self.client, self.experiment_id, search)

    def create_search(self, search: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Create the parent run of a new search; UserError if that name is already taken.

        Two searches started at once with one name must not share (merge into) one run.
        The check-then-create runs under a registry mutex, so of two racing creators
        exactly one proceeds; a final check also catches a writer that took no mutex (an
        older calotune): if another run carries the name, this one deletes its own run.
        """
        lock = f"{search}.e{self.experiment_id}.search-lock"
        where = f"experiment {self.experiment!r} of {redact(self.uri)}"
        with registry_mutex(self.client, lock, what=f"creates search {search!r}", timeout_s=60,
                            stale_s=120), store_errors(f"creating search {search!r} in {where}"):
            existing = self._search_runs_named(search)
            if existing:
                raise UserError(
                    f"a search named {search!r} already exists in {where} (run "
                    f"{existing[0].info.run_id}); resume it with --resume, or start a new one "
                    f"under another name")
            run = self.client.create_run(
                self.experiment_id, run_name=search,
                tags={TAG_SEARCH: search, TAG_KIND: "search", "mlflow.user": user(), **tags},
            )
            run_id = run.info.run_id
            others = [r.info.run_id for r in self._search_runs_named(search) if r.info.run_id != run_id]
            if others:
                self.client.delete_run(run_id)
                raise UserError(f"another search named {search!r} was started at the same moment in "
                                f"{where} (run {others[0]}); start this one again under another name")
            self.log_params(run_id, params)
        self.parent_run_id = run_id
        return run_id

    def attach_search(self, search: str, *, reopen: bool = False) -> str:
        """The parent run of an existing search (resume, the Ray callback); UserError if none.

        ``reopen``: mark it RUNNING again (a resumed search); the callback, which runs
        while the driver owns the run, leaves its status alone.
        """
        where = f"experiment {self.experiment!r} of {redact(self.uri)}"
        with store_errors(f"finding search {search!r} in {where}"):
            found = self._search_runs_named(search)
            if not found:
                raise UserError(f"no search named {search!r} in {where}; run without --resume to "
                                f"start one, or pass the --home / --tracking-uri it used")
            if len(found) > 1:
                raise UserError(f"{len(found)} runs carry the search name {search!r} in {where} "
                                f"({', '.join(r.info.run_id for r in found)}); delete all but one "
                                f"in MLflow, then resume")
            run_id = found[0].info.run_id
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
            self.parent_run_id = run_id
            self.refresh()
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
        assert self.parent_run_id is not None, "create_search or attach_search first"
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
        tags = {TAG_STATE: state}
        if reason:  # a family's own pruning (TrialPruned) says why, as a failure does
            key = "calotune.pruned_reason" if state == "pruned" else "calotune.failure_reason"
            tags[key] = reason[:4900]
        self.set_tags(run_id, tags)
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
        """All of ``tags`` in one write (one transaction on a SQL store, one request to a server)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(run_id, tags=items[i : i + 100])

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


def search_runs_named(client, experiment_id: str, search: str) -> list:
    """Active parent runs of search ``search``, oldest first (deleted runs do not count).

    Read-only: the resume check uses it before anything is written."""
    filt = f"tags.`{TAG_SEARCH}` = '{_quote(search)}' and tags.`{TAG_KIND}` = 'search'"
    runs = client.search_runs([experiment_id], filter_string=filt, max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _quote(value: str) -> str:
    """A value for an MLflow filter string; MLflow's filter parser has no escape for quotes."""
    if "'" in value or "`" in value:
        raise UserError(f"name {value!r} must not contain quotes or backticks")
    return value
