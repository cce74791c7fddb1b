"""A trained model on disk: ``model.json`` (what to build) + ``weights.pt`` (tensors only).

MLflow's PyTorch flavour pickles the whole module, and unpickling a model from a shared
registry executes whatever code the pickle names. calotune stores a JSON description and a
``state_dict`` loaded with ``torch.load(weights_only=True)``, which refuses any payload
that is not plain tensors and containers, so loading a registered model runs no stored code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from calotune import __version__
from calotune.detectors import get_detector
from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.models.base import GenerativeModel
from calotune.models.registry import build_model

MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
FORMAT = "calotune-model/1"


def save_model(
    out_dir: Path,
    model: GenerativeModel,
    *,
    family: str,
    detector: Detector,
    params: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the model description and weights into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    description = {
        "format": FORMAT,
        "calotune_version": __version__,
        "family": family,
        "detector": detector.name,
        "geometry": detector.geometry_dict(),
        "params": params,
        "info": info or {},
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS)
    (out_dir / MODEL_JSON).write_text(json.dumps(description, indent=2, sort_keys=True))
    return out_dir


def read_description(model_dir: Path) -> dict[str, Any]:
    """A saved model's ``model.json`` (family, detector, geometry, params), checked."""
    description_path = model_dir / MODEL_JSON
    weights_path = model_dir / WEIGHTS
    if not description_path.is_file() or not weights_path.is_file():
        raise UserError(
            f"{model_dir} is not a calotune model: it needs {MODEL_JSON} and {WEIGHTS} "
            f"(found: {sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else 'nothing'})"
        )
    try:
        description = json.loads(description_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{description_path}: not valid JSON ({exc})") from None
    if description.get("format") != FORMAT:
        raise UserError(f"{description_path}: format {description.get('format')!r}, expected {FORMAT!r}")
    return description


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GenerativeModel, Detector, dict]:
    """Rebuild a saved model without unpickling code; UserError on anything unexpected."""
    description = read_description(model_dir)
    description_path, weights_path = model_dir / MODEL_JSON, model_dir / WEIGHTS
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{weights_path}: refused to load: the file is not a plain tensor state_dict "
            f"(it may carry pickled code). calotune only loads weights with "
            f"torch.load(weights_only=True). Detail: {first_line}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{weights_path}: expected a dict of tensors (a state_dict)")
    detector = get_detector(description["detector"], **description["geometry"])
    model = build_model(description["family"], description["params"], detector)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights_path}: weights do not match the model in {description_path}: {exc}") from None
    model.to(device).eval()
    return model, detector, description
