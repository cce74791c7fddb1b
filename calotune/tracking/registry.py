"""Registered models: resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, fetch them.

Registry stages are deprecated in MLflow 3; calotune uses aliases only: ``candidate`` for a
search's best model, ``production`` for the promoted one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from calotune.errors import UserError
from calotune.tracking.mlflow_tracker import _client

log = logging.getLogger(__name__)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a models:/ URI; UserError with the accepted forms."""
    match = _URI.match(uri)
    if not match:
        raise UserError(
            f"model URI {uri!r} is not understood; use models:/NAME@ALIAS (e.g. "
            f"models:/zdc@production) or models:/NAME/VERSION"
        )
    return match["name"], match["alias"], match["version"]


def resolve(tracking_uri: str, name: str, alias: str | None = None, version: str | None = None,
            required: bool = True) -> ModelRef | None:
    """Look up a model version by alias or number; UserError naming what is missing."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models() if not m.name.endswith("-lock"))
        raise UserError(
            f"no registered model {name!r} in {tracking_uri}; registered models: "
            f"{', '.join(known) or 'none (run a search first)'}"
        ) from None
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, str(version)))
    except MlflowException:
        if not required:
            return None
        what = f"alias {alias!r}" if alias else f"version {version}"
        aliases = client.get_registered_model(name).aliases
        raise UserError(
            f"registered model {name!r} has no {what}; its aliases: "
            f"{', '.join(f'{a}->v{v}' for a, v in sorted(aliases.items())) or 'none'}"
        ) from None
    return ModelRef(name=name, version=str(mv.version), source=mv.source,
                    tags=dict(mv.tags), aliases=tuple(mv.aliases))


def download(tracking_uri: str, ref: ModelRef, dst: Path) -> Path:
    """Fetch a model version's files into a local folder (the caller owns its lifetime)."""
    import mlflow.artifacts

    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=ref.source, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local)


@contextmanager
def promotion_lock(tracking_uri: str, name: str, timeout_s: float = 600.0,
                   stale_s: float = 1800.0) -> Iterator[None]:
    """Serialise promotions of one registered model across processes and machines.

    MLflow has no compare-and-set on aliases, but creating a registered model is atomic
    (names are unique in every backend), so a lock model ``<name>.promotion-lock`` acts as
    a mutex that works the same on SQLite, PostgreSQL and a tracking server. A lock older
    than ``stale_s`` (a promoter that was killed) is broken.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    lock = f"{name}.promotion-lock"
    holder = f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": holder, "since": f"{time.time():.3f}"},
                description=f"held by calotune.promote while it moves the aliases of {name}",
            )
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        try:
            current = client.get_registered_model(lock)
            if time.time() - float(current.tags.get("since", "0")) > stale_s:
                log.warning("breaking stale promotion lock held by %s", current.tags.get("holder"))
                client.delete_registered_model(lock)
                continue
            other = current.tags.get("holder", "?")
        except MlflowException:
            continue  # released between our two calls: try again at once
        if time.monotonic() > deadline:
            raise UserError(f"another promotion of {name!r} ({other}) holds the lock; try again, or "
                            f"delete registered model {lock!r} if that process is gone")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        client.delete_registered_model(lock)
