"""Model-family registry: name -> module holding ``Config``, ``build`` and ``DETECTORS``.

A family module exposes:
  Config: a dataclass of every tunable knob, with defaults that train a sane model;
  build(config: Config, detector: Detector) -> GenerativeModel;
  DETECTORS: tuple of detector names (or name prefixes) the family can generate for.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.models.base import GenerativeModel

_FAMILIES: dict[str, str] = {
    "zdc_swiglu": "calotune.models.zdc_swiglu",
}


def family_names() -> list[str]:
    """All registered family names."""
    return sorted(_FAMILIES)


def get_family(name: str) -> ModuleType:
    """The family module for ``name``; UserError listing the known ones otherwise."""
    if name not in _FAMILIES:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(family_names())}")
    return importlib.import_module(_FAMILIES[name])


def config_fields(name: str) -> dict[str, dataclasses.Field]:
    """The tunable fields of a family's Config."""
    return {f.name: f for f in dataclasses.fields(get_family(name).Config)}


def make_config(name: str, params: dict[str, Any]) -> Any:
    """A family's Config from flat parameters; unknown names are a UserError."""
    fields = config_fields(name)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UserError(
            f"model family {name!r} has no parameter(s) {unknown}; its parameters are: "
            f"{', '.join(sorted(fields))}"
        )
    return get_family(name).Config(**params)


def build_model(name: str, params: dict[str, Any], detector: Detector) -> GenerativeModel:
    """Build a family's model for a detector from flat parameters."""
    return get_family(name).build(make_config(name, params), detector)
