"""Where each search's Optuna study lives, so ``optuna-dashboard`` can open it.

Ray Tune's ``OptunaSearch`` keeps its study in memory: the sampler's history is visible
only inside the driver, and lost with it. calotune copies every search's trials into a
study in an Optuna ``RDBStorage``, named after the search:

- default: SQLite ``optuna.db`` next to the MLflow store (``<home>/optuna.db``, or the
  folder of a ``sqlite:///`` tracking URI), opened with
  ``optuna-dashboard sqlite:////ABS/PATH/optuna.db``;
- ``--study-storage URI``: a relational database of the team, e.g. a database ``optuna``
  on the MLflow server's PostgreSQL (``postgresql://USER@HOST/optuna``). It must be its
  own database: MLflow and Optuna each keep an Alembic ``alembic_version`` table, so
  sharing one database would break the schema migrations of both.

Why a mirror and not Ray's ``OptunaSearch(storage=...)``: Ray Tune pickles the searcher
into its experiment snapshots, and ``--resume`` continues from the last snapshot. With the
study itself in a database, the database runs ahead of the snapshot: a trial that ended
after the snapshot but before a kill is finished in the database while the resumed search
continues it, and Optuna refuses every later report ("Trial#0 has already finished and can
not be updated": the resumed search dies). So the searcher keeps its in-memory study (the
snapshot is its whole truth, as before) and :class:`StudyMirror` copies each trial into
the database study when it ends: parameters, distributions, value(s), state and every
intermediate value, tagged with Ray's trial id (user attribute ``ray_trial_id``). A
trial that ends again after a resume is not copied twice. The mirror pickles as its URI
and study name; a failing database costs a warning, never the search.

Two searches at once write to one SQLite file under SQLite's own locking (a generous busy
timeout, never a corrupt file), in studies of different names; the first creation of the
schema is serialised by a lock file, as for the MLflow store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: The file next to a SQLite MLflow store that holds the Optuna studies.
STUDY_DB = "optuna.db"
#: Seconds a writer waits for another process's SQLite write lock before it gives up.
SQLITE_BUSY_TIMEOUT_S = 120
ACCEPTED = "sqlite:////ABSOLUTE/PATH/optuna.db, postgresql[+DRIVER]://USER@HOST/DB or mysql[+DRIVER]://USER@HOST/DB"


def default_study_storage(home: Path, tracking_uri: str) -> str:
    """SQLite ``optuna.db`` beside the MLflow SQLite store, else in ``home``.

    With a tracking server or a team database as the MLflow store, the default stays a
    SQLite file on the driver's ``--home``: the search's driver is the only writer, and
    the team points ``--study-storage`` at its own database server when it wants one.
    """
    if urlparse(tracking_uri).scheme.partition("+")[0].lower() == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(tracking_uri).database or ""
        if database and Path(database).is_absolute():
            return f"sqlite:///{Path(database).parent / STUDY_DB}"
    return f"sqlite:///{(home / STUDY_DB).resolve()}"


def check_study_storage(uri: str, label: str = "--study-storage") -> None:
    """Refuse, before anything is written, a study storage that cannot be opened or would
    not last (in-memory or relative SQLite, an unknown scheme, an unreachable database)."""
    from calotune.tracking.mlflow_tracker import _check_database, redact

    where = f"{label} {redact(uri)}"
    scheme = urlparse(uri).scheme.lower()
    base = scheme.partition("+")[0]
    if base == "sqlite":
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            database = make_url(uri).database or ""
        except ArgumentError as exc:
            raise UserError(f"{where}: not a valid SQLAlchemy URL ({exc}); use {ACCEPTED}") from None
        if database in {"", ":memory:"} or database.startswith("file:"):
            raise UserError(f"{where}: an in-memory study vanishes with the search; give a file, "
                            f"e.g. sqlite:///{Path.cwd().resolve() / '.calotune' / STUDY_DB}")
        path = Path(database)
        if not path.is_absolute():
            raise UserError(f"{where}: the SQLite path {database!r} is relative; give an absolute path "
                            f"(four slashes), e.g. sqlite:///{(Path.cwd() / path).resolve()}")
        if path.is_dir():
            raise UserError(f"{where}: {path} is a folder; point at a file, e.g. sqlite:///{path / STUDY_DB}")
        if not path.parent.is_dir():
            raise UserError(f"{where}: folder {path.parent} does not exist; create it or pick another")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UserError(f"{where}: folder {path.parent} is not writable; pick another")
    elif base in {"postgresql", "mysql"}:
        _check_database(uri, where, base)
    else:
        raise UserError(f"{where}: unsupported study storage; use {ACCEPTED}")


def _creation_lock(uri: str):
    """Serialise the first opening (schema creation) of a SQLite study file across
    processes: two searches creating the tables at once would otherwise race. The same
    ``<db>.lock`` as the MLflow store's first opening."""
    from calotune.tracking.mlflow_tracker import _first_open_lock

    return _first_open_lock(uri, "study storage")


def engine_kwargs(uri: str) -> dict[str, Any]:
    """SQLite: wait for another writer's lock instead of failing at once (Python's default
    is 5 s, short on a loaded machine with two searches); servers: Optuna's defaults."""
    if urlparse(uri).scheme.partition("+")[0].lower() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {}


def open_storage(uri: str, label: str = "--study-storage"):
    """An Optuna ``RDBStorage`` on ``uri`` with its schema in place; UserError if it fails."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    from calotune.tracking.mlflow_tracker import redact

    try:
        with _creation_lock(uri):
            return optuna.storages.RDBStorage(uri, engine_kwargs=engine_kwargs(uri))
    except (SQLAlchemyError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label} {redact(uri)}: cannot open the Optuna study storage ({first}); "
                        f"check the URI, or drop the flag to use {STUDY_DB} next to the MLflow store") from None


def dashboard_command(uri: str) -> str:
    """The command that opens the studies in ``uri`` (the password redacted)."""
    from calotune.tracking.mlflow_tracker import redact

    return f"optuna-dashboard {redact(uri)}"


#: User attribute of a mirrored trial: Ray Tune's trial id (the MLflow trial run's name).
RAY_TRIAL_ATTR = "ray_trial_id"


class StudyMirror:
    """Copies the searcher's finished trials into a database study (see the module notes)."""

    def __init__(self, uri: str, study_name: str, directions: list[str]) -> None:
        self.uri, self.study_name, self.directions = uri, study_name, list(directions)
        self._study: Any = None
        self._seen: set[str] = set()
        self._broken = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # pickled into Ray Tune's snapshots with the searcher
        state.update(_study=None, _seen=set(), _broken=False)
        return state

    def open(self):
        """The database study (created if new), and the Ray trial ids it already holds."""
        if self._study is None:
            import optuna

            study = optuna.create_study(storage=open_storage(self.uri), study_name=self.study_name,
                                        directions=self.directions, load_if_exists=True)
            self._seen = {str(t.user_attrs.get(RAY_TRIAL_ATTR)) for t in study.get_trials(deepcopy=False)}
            self._study = study
        return self._study

    def add(self, trial_id: str, frozen) -> None:
        """Copy one finished trial (an Optuna ``FrozenTrial``); a database error is a warning."""
        if self._broken or trial_id in self._seen or not frozen.state.is_finished():
            return
        import optuna

        try:
            study = self.open()
            if trial_id in self._seen:
                return
            values = frozen.values if frozen.state == optuna.trial.TrialState.COMPLETE else None
            study.add_trial(optuna.trial.create_trial(
                state=frozen.state, values=values, params=frozen.params, distributions=frozen.distributions,
                user_attrs={**frozen.user_attrs, RAY_TRIAL_ATTR: trial_id}, system_attrs=frozen.system_attrs,
                intermediate_values=frozen.intermediate_values))
            self._seen.add(trial_id)
        except Exception as exc:  # the study is a view for humans: it must never stop the search
            self._broken = True
            log.warning("Optuna study %s in %s: trials are no longer copied there (%s: %s)", self.study_name,
                        _redacted(self.uri), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


def _redacted(uri: str) -> str:
    from calotune.tracking.mlflow_tracker import redact

    return redact(uri)
