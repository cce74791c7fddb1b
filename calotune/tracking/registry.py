"""Registered models: resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, fetch them.

Registry stages are deprecated in MLflow 3; calotune uses aliases only: ``candidate`` for a
search's best model, ``production`` for the promoted one.

Also the two identities that decide what may be compared with what: :func:`file_hash` (the
data a search trained on, recorded as tag ``data_hash``) and :func:`registered_model_name`
(one registered model per detector geometry, so a shrunken test geometry never competes
with the real one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calotune.errors import UserError
from calotune.tracking.mlflow_tracker import _client, redact, registry_mutex, store_errors

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
    with store_errors(f"registered model {name!r} in {redact(tracking_uri)}"):
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                raise
            known = sorted(m.name for m in client.search_registered_models(max_results=1000)
                           if not m.name.endswith("-lock"))
            raise UserError(
                f"no registered model {name!r} in {redact(tracking_uri)}; registered models: "
                f"{', '.join(known) or 'none (run a search first)'}"
            ) from None
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, str(version)))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and \
                    "INVALID_PARAMETER_VALUE" not in str(exc.error_code):
                raise
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


class ArtifactsMissing(UserError):
    """A registered version whose files are gone (its run's artifact folder was deleted):
    it can be neither loaded nor scored; ``promote --force`` may still move past it."""


def download(tracking_uri: str, ref: ModelRef, dst: Path) -> Path:
    """Fetch a model version's files into a local folder (the caller owns its lifetime).

    :class:`ArtifactsMissing` if the files are gone or incomplete, so callers can tell a
    vanished model from an unreachable store.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from calotune.artifacts import MODEL_JSON, WEIGHTS

    dst.mkdir(parents=True, exist_ok=True)
    label = f"registered model {ref.name!r} version {ref.version}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=ref.source, dst_path=str(dst), tracking_uri=tracking_uri))
    except (MlflowException, OSError) as exc:
        raise ArtifactsMissing(f"{label}: its artifacts at {ref.source} cannot be read "
                               f"({_first_line(exc)}); they were deleted or moved") from None
    missing = [f for f in (MODEL_JSON, WEIGHTS) if not (local / f).is_file()]
    if missing:
        raise ArtifactsMissing(f"{label}: its artifacts at {ref.source} lack {', '.join(missing)}; "
                               f"they were deleted or never uploaded")
    return local


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextmanager
def promotion_lock(tracking_uri: str, name: str, timeout_s: float = 600.0,
                   stale_s: float = 1800.0) -> Iterator[None]:
    """Serialise promotions of one registered model across processes and machines.

    MLflow has no compare-and-set on aliases, but creating a registered model is atomic
    (names are unique in every accepted backend), so a lock model ``<name>.promotion-lock``
    acts as a mutex that works the same on SQLite, PostgreSQL and a tracking server. A lock
    older than ``stale_s`` (a promoter that was killed) is broken.
    """
    client = _client(tracking_uri)
    with registry_mutex(client, f"{name}.promotion-lock", what=f"moves the aliases of {name!r}",
                        timeout_s=timeout_s, stale_s=stale_s):
        yield


# --- identities: data and geometry --------------------------------------------------------
def file_hash(path: Path) -> str:
    """The data identity recorded by a search (tag ``data_hash``): sha256, first 16 hex.

    One function, used by the search when it records and by promote when it checks, so
    the two can never disagree on what "the same file" means. Raises OSError.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _canonical(geometry: dict[str, Any]) -> str:
    return json.dumps(geometry, sort_keys=True, separators=(",", ":"), default=str)


def geometry_digest(geometry: dict[str, Any]) -> str:
    """A short stable digest of a geometry dict (key order and tuple/list do not matter)."""
    return hashlib.sha256(_canonical(geometry).encode()).hexdigest()[:8]


def registered_model_name(detector_name: str, geometry: dict[str, Any],
                          default_geometry: dict[str, Any]) -> str:
    """``zdc`` for the detector's default geometry, ``zdc-g1a2b3c4d`` for any other.

    Models of different geometries cannot be compared (different cells) and must never
    replace one another in production, so each geometry gets its own registered model;
    the default keeps the bare name users type (``models:/zdc@production``).
    """
    if _canonical(geometry) == _canonical(default_geometry):
        return detector_name
    return f"{detector_name}-g{geometry_digest(geometry)}"


def geometry_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: A != B`` for every field where two geometries differ (for messages)."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '(absent)')!r} != {b.get(k, '(absent)')!r}" for k in keys
            if _canonical({"v": a.get(k)}) != _canonical({"v": b.get(k)})]
