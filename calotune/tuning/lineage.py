"""Searches on a registered model: fetch the parent once, check it fits, hand it to trials.

A group that has a good autoencoder searches only its prior (``train_phases``), or
tunes only how a trained model samples (a sampling-only search), without retraining
what works. The parent is resolved and checked once in the driver, its two files go to
the trials through Ray's object store (no shared filesystem needed), and every run and
registered version of the search carries the tag ``calotune.parent_model`` so its
lineage can be followed in MLflow.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calotune.errors import UserError

#: Tag on the search run, its trial runs and its registered version: NAME/VERSION.
PARENT_TAG = "calotune.parent_model"


@dataclass(frozen=True)
class ParentModel:
    """A registered model a search starts from."""

    uri: str  # as the space wrote it: models:/NAME@ALIAS or models:/NAME/VERSION
    label: str  # NAME/VERSION, what the alias pointed at when the search was planned
    files: dict[str, bytes]  # model.json and weights.pt
    params: dict[str, Any]  # the parent's Config values, the base every trial overrides
    tags: dict[str, str]  # the registered version's tags (data hash, split seed, ...)


def load_parent(spec: Any, detector: Any, tracking_uri: str, pinned: str | None = None) -> ParentModel:
    """Resolve ``spec.base_model`` (or ``pinned``, the models:/NAME/VERSION a resumed search
    started from) in the registry and check it can be searched on.

    UserError when it is of another family or detector geometry, lacks a phase that
    ``train_phases`` names, or its files are gone.
    """
    from calotune.artifacts import MODEL_JSON, WEIGHTS
    from calotune.tracking import registry

    name, alias, version = registry.parse_model_uri(pinned or spec.base_model)
    ref = registry.resolve(tracking_uri, name, alias=alias, version=version)
    label = f"{ref.name}/{ref.version}"
    with tempfile.TemporaryDirectory(prefix="calotune-parent-") as tmp:
        folder = registry.download(tracking_uri, ref, Path(tmp))
        files = {f: (folder / f).read_bytes() for f in (MODEL_JSON, WEIGHTS)}
    model, description = materialise(files)
    where = f"{spec.source}: base_model {spec.base_model} ({label})"
    if description["family"] != spec.family:
        raise UserError(f"{where}: is a {description['family']!r} model, but the space searches "
                        f"{spec.family!r}; name a registered {spec.family!r} model")
    if description["detector"] != spec.detector or description["geometry"] != detector.geometry_dict():
        raise UserError(f"{where}: was trained for detector {description['detector']!r} with another "
                        f"geometry than the space's {spec.detector!r}; its cells cannot be compared. "
                        f"Use the parent's detector and geometry in the space")
    phases = {p.name: p for p in model.phases()}
    missing = [p for p in spec.train_phases or () if p not in phases]
    if missing:
        raise UserError(f"{where}: has no phase {missing[0]!r}; its phases: {sorted(phases)}")
    if spec.train_phases and not phases[[p for p in phases if p in spec.train_phases][-1]].scoreable:
        raise UserError(f"{where}: the last retrained phase must be scoreable (a trial must end on a "
                        f"score); add a later phase to train_phases")
    return ParentModel(uri=spec.base_model, label=label, files=files,
                       params=dict(description["params"]), tags=dict(ref.tags))


def check_parent_data(parent: ParentModel, data_hash: str, seed: int, spec: Any) -> None:
    """The held-out test split must be one the parent never trained on.

    Same file: the split must be the parent's (same seed and fractions), or the parent's
    training events would be scored as held-out. Another file: independent data, fine.
    """
    tags = parent.tags
    if tags.get("data_hash") != data_hash:
        return
    theirs = (tags.get("split_seed"), tags.get("validation_fraction"), tags.get("test_fraction"))
    ours = (str(seed), str(spec.data.validation_fraction), str(spec.data.test_fraction))
    if theirs != ours:
        raise UserError(
            f"{spec.source}: base_model {parent.label} was trained on the same file with split seed "
            f"{theirs[0]} and fractions {theirs[1]}/{theirs[2]}; this search would split it with seed "
            f"{ours[0]} and {ours[1]}/{ours[2]}, so its held-out test events would include the parent's "
            f"training events. Pass --seed {theirs[0]} and the same data fractions, or use another file")


def materialise(files: dict[str, bytes]) -> tuple[Any, dict[str, Any]]:
    """The parent as a model on CPU and its description, from its files (written to a
    temporary folder, loaded by :func:`calotune.artifacts.load_model`: no stored code runs)."""
    from calotune.artifacts import load_model

    with tempfile.TemporaryDirectory(prefix="calotune-parent-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        model, _, description = load_model(Path(tmp))
    return model, description
