"""Detector registry: name -> factory, imported lazily so start-up stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from calotune.detectors.base import Detector
from calotune.errors import UserError

# name -> "module:factory"; the factory accepts geometry overrides as keyword arguments.
_REGISTRY: dict[str, str] = {
    "zdc": "calotune.detectors.zdc:ZDC",
    "calochallenge-1-photons": "calotune.detectors.calochallenge:dataset_1_photons",
    "calochallenge-1-pions": "calotune.detectors.calochallenge:dataset_1_pions",
    "calochallenge-2": "calotune.detectors.calochallenge:dataset_2",
    "calochallenge-3": "calotune.detectors.calochallenge:dataset_3",
    "cepc-ecal": "calotune.detectors.cepc:CEPCECal",
    "hgcal": "calotune.detectors.hgcal:HGCal",
    "atlas-regular": "calotune.detectors.atlas_regular:atlas_regular",
}


def detector_names() -> list[str]:
    """All registered detector names."""
    return sorted(_REGISTRY)


def get_detector(name: str, /, **geometry: Any) -> Detector:
    """Build a registered detector, optionally overriding geometry fields."""
    if name not in _REGISTRY:
        raise UserError(
            f"unknown detector {name!r}; known detectors: {', '.join(detector_names())}"
        )
    module, attr = _REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module), attr)
    try:
        return factory(**geometry)
    except TypeError as exc:
        raise UserError(f"detector {name!r}: bad geometry override {geometry}: {exc}") from None
