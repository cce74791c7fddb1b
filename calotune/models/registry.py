"""Model-family registry: name -> module holding ``Config``, ``build`` and ``DETECTORS``.

A family module exposes:
  Config: a dataclass of every tunable knob, with defaults that train a sane model;
  build(config: Config, detector: Detector) -> GenerativeModel;
  DETECTORS: tuple of detector names (or name prefixes) the family can generate for.

Config fields declare their types and bounds (:func:`calotune.models.base.bounded`) and
the Config's ``__post_init__`` raises ValueError for rules between fields, so that
:func:`check_param` and :func:`validate_params` can refuse a bad value by name before any
trial starts, without the caller knowing the family.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from types import ModuleType
from typing import Any

from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.models.base import ConfigFieldError, GenerativeModel, check_field
from calotune.models.base import show as _show

_FAMILIES: dict[str, str] = {
    "zdc_swiglu": "calotune.models.zdc_swiglu",
    "cepc_transformer": "calotune.models.cepc_transformer",
    "atlas_qvae": "calotune.models.atlas_qvae",
    "hgcal_score": "calotune.models.hgcal_score",
    "calochallenge_vq": "calotune.models.calochallenge_vq",
}


def family_names() -> list[str]:
    """All registered family names."""
    return sorted(_FAMILIES)


def get_family(name: str) -> ModuleType:
    """The family module for ``name``; UserError listing the known ones otherwise."""
    if name not in _FAMILIES:
        raise UserError(f"unknown model family {_show(name)}; known families: {', '.join(family_names())}")
    return importlib.import_module(_FAMILIES[name])


@functools.cache
def _fields(name: str) -> dict[str, dataclasses.Field]:
    # cached: a search space's corner checks look them up thousands of times
    return {f.name: f for f in dataclasses.fields(get_family(name).Config)}


def config_fields(name: str) -> dict[str, dataclasses.Field]:
    """The tunable fields of a family's Config."""
    return dict(_fields(name))


class ParamError(UserError):
    """A parameter value a family refuses.

    ``param`` is the parameter's name (None for a rule between several parameters) and
    ``reason`` the rule and value without the family prefix, so that a caller that knows
    where the value came from (a search-space file and key) can put that first instead.
    """

    def __init__(self, family: str, param: str | None, reason: str) -> None:
        super().__init__(f"model family {family!r}: {param + ': ' if param else ''}{reason}")
        self.family = family
        self.param = param
        self.reason = reason


def _check_known(name: str, params: dict[str, Any]) -> dict[str, dataclasses.Field]:
    fields = _fields(name)
    unknown = sorted(str(k) for k in params if k not in fields)
    if unknown:
        raise ParamError(
            name, unknown[0],
            f"not a parameter of this family (unknown: {unknown}); its parameters are: "
            f"{', '.join(sorted(fields))}",
        )
    return fields


def check_param(family: str, name: str, value: Any) -> None:
    """Check one value against one Config field's declared type and bounds.

    Only per-field rules: a value that is fine on its own may still clash with another
    field (see :func:`validate_params`). Raises ParamError naming the parameter.
    """
    _check_known(family, {name: value})
    try:
        check_field(get_family(family).Config, name, value)
    except ConfigFieldError as exc:
        raise ParamError(family, name, str(exc)) from None


def validate_params(family: str, values: dict[str, Any]) -> None:
    """Refuse, with a ParamError, flat parameters the family's Config would refuse.

    ``values`` are the parameters a trial overrides; the others keep their Config
    defaults, exactly as :func:`make_config` builds them. Field types and bounds are
    checked first, so that the error names the parameter; then the Config itself is
    built, which applies the family's rules between fields.
    """
    _check_known(family, values)
    config = get_family(family).Config
    for name, value in values.items():
        try:
            check_field(config, name, value)
        except ConfigFieldError as exc:
            raise ParamError(family, name, str(exc)) from None
    try:
        config(**values)
    except ConfigFieldError as exc:
        raise ParamError(family, exc.name, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise ParamError(family, None, str(exc)) from None


def make_config(name: str, params: dict[str, Any]) -> Any:
    """A family's Config from flat parameters; a value it refuses is a ParamError (UserError)."""
    validate_params(name, params)
    return get_family(name).Config(**params)


def build_model(name: str, params: dict[str, Any], detector: Detector) -> GenerativeModel:
    """Build a family's model for a detector from flat parameters."""
    return get_family(name).build(make_config(name, params), detector)
