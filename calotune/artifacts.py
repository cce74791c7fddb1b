"""A trained model on disk: ``model.json`` (what to build) + ``weights.pt`` (tensors only).

MLflow's PyTorch flavour pickles the whole module, and unpickling a model from a shared
registry executes whatever code the pickle names. calotune stores a JSON description and a
``state_dict`` loaded with ``torch.load(weights_only=True)``, which refuses any payload
that is not plain tensors and containers, so loading a registered model runs no stored code.

A family's preparation (:meth:`GenerativeModel.prepare`, statistics of the training
data) is part of the model: its tensors are buffers in weights.pt (``prepared.<name>``)
and model.json declares their dtypes and shapes under ``prepared.tensors`` and holds its
JSON values under ``prepared.values``, so a loaded model samples exactly as the trained one.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from calotune import __version__
from calotune.data.hdf5 import check_memory
from calotune.detectors import detector_names, get_detector
from calotune.detectors.base import Detector
from calotune.errors import UserError
from calotune.models.base import GenerativeModel, show
from calotune.models.registry import build_model, family_names

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
    prepared = model.preparation()
    if prepared:
        # The tensors are in weights.pt already (buffers ``prepared.<name>``); their dtypes
        # and shapes are declared here, because they depend on the data and a loader must
        # create them before it can check weights.pt against the model.
        description["prepared"] = {
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in prepared.items() if isinstance(v, torch.Tensor)},
            "values": {k: v for k, v in prepared.items() if not isinstance(v, torch.Tensor)},
        }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS)
    (out_dir / MODEL_JSON).write_text(json.dumps(description, indent=2, sort_keys=True))
    return out_dir


#: model.json is a few KB; anything this large is not one (and would be read into memory).
MAX_DESCRIPTION_BYTES = 1 << 20
#: weights.pt may exceed the parameters' bytes by the zip/pickle framing, never by more.
_WEIGHTS_SLACK_BYTES = 1 << 20
#: what torch.load raises for a damaged or foreign file (weights_only refusals included).
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, ValueError,
                OSError, KeyError, IndexError, UnicodeDecodeError, zipfile.BadZipFile, NotImplementedError,
                OverflowError, MemoryError)
#: what building a family's model from bad parameters can raise besides UserError.
_BUILD_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError, KeyError,
                 IndexError, AttributeError, NotImplementedError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_description(model_dir: Path) -> dict[str, Any]:
    """A saved model's ``model.json`` (family, detector, geometry, params), checked.

    A model folder may come from anyone with registry access, so every key is checked
    for presence and type, the family and the detector must be known, and the geometry
    must build the detector: a bad file is one UserError naming the file and the key,
    never a traceback from deep inside the model code.
    """
    model_dir = Path(model_dir)
    description_path = model_dir / MODEL_JSON
    weights_path = model_dir / WEIGHTS
    if not description_path.is_file() or not weights_path.is_file():
        try:
            found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else "nothing"
        except OSError:
            found = "unreadable"
        raise UserError(
            f"{model_dir} is not a calotune model: it needs {MODEL_JSON} and {WEIGHTS} (found: {found})"
        )
    try:
        size = description_path.stat().st_size
        if size > MAX_DESCRIPTION_BYTES:
            raise UserError(f"{description_path}: {size} bytes, but a model description is a few KB "
                            f"(limit {MAX_DESCRIPTION_BYTES}); this is not a calotune model.json")
        description = json.loads(description_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{description_path}: not valid JSON ({_first_line(exc)}); re-save the model") from None
    except OSError as exc:
        raise UserError(f"{description_path}: cannot be read ({exc.strerror or _first_line(exc)})") from None
    if not isinstance(description, dict):
        raise UserError(f"{description_path}: must hold a JSON object, got {type(description).__name__}")
    if description.get("format") != FORMAT:
        raise UserError(f"{description_path}: key 'format' is {description.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("family", str), ("detector", str), ("geometry", dict), ("params", dict)):
        if key not in description:
            raise UserError(f"{description_path}: key {key!r} is missing; re-save the model with calotune")
        if not isinstance(description[key], kind):
            raise UserError(f"{description_path}: key {key!r} must be a JSON "
                            f"{'string' if kind is str else 'object'}, got {description[key]!r:.80}")
    if not isinstance(description.get("info", {}), dict):
        raise UserError(f"{description_path}: key 'info' must be a JSON object")
    if description["family"] not in family_names():
        raise UserError(f"{description_path}: key 'family': unknown model family {description['family']!r}; "
                        f"known families: {', '.join(family_names())}")
    if description["detector"] not in detector_names():
        raise UserError(f"{description_path}: key 'detector': unknown detector {description['detector']!r}; "
                        f"known detectors: {', '.join(detector_names())}")
    _detector(description, description_path)
    return description


def _detector(description: dict[str, Any], description_path: Path) -> Detector:
    """The detector a checked description names, errors naming the key 'geometry'."""
    try:
        return get_detector(description["detector"], **description["geometry"])
    except (UserError, *_BUILD_ERRORS) as exc:
        raise UserError(f"{description_path}: key 'geometry': {_first_line(exc)}") from None


def _build(description: dict[str, Any], detector: Detector, description_path: Path,
           weights_bytes: int) -> GenerativeModel:
    """The family's model for the description's params, errors naming the key 'params'.

    The model is first built on torch's meta device (no memory), so params that would
    need more parameters than weights.pt can hold (or than memory holds) are refused
    before anything is allocated.
    """
    family, params = description["family"], description["params"]
    try:
        try:
            with torch.device("meta"):
                shell = build_model(family, params, detector)
        except NotImplementedError:
            shell = None  # a family that needs real tensors to build: skip the size check
        if shell is not None:
            need = sum(t.numel() * t.element_size() for t in shell.state_dict().values())
            # tied weights are stored once, so the file may be smaller than ``need``, not 4x smaller
            if need > 4 * weights_bytes + _WEIGHTS_SLACK_BYTES:
                raise UserError(
                    f"{description_path}: key 'params' describe a model of {need} bytes of weights, but "
                    f"{WEIGHTS} has only {weights_bytes}; the description and the weights do not belong together"
                )
            check_memory(need, f"{description_path}: key 'params'", "the model is too large for this machine")
        return build_model(family, params, detector)
    except UserError as exc:
        message = str(exc)
        if message.startswith(str(description_path)):
            raise
        raise UserError(f"{description_path}: key 'params': {message}") from None
    except _BUILD_ERRORS as exc:
        raise UserError(f"{description_path}: key 'params' are refused by family {family!r}: "
                        f"{_first_line(exc)}") from None


def _check_state(state: dict[str, torch.Tensor], model: GenerativeModel, weights_path: Path,
                 description_path: Path) -> None:
    """Every tensor the model expects, with its exact shape and dtype, and nothing else.

    ``load_state_dict`` would silently cast a float64 or int tensor into a float32
    parameter; a file that disagrees on dtype was not written for this model.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        raise UserError(f"{weights_path}: tensors do not match the model in {description_path}: "
                        f"{'; '.join(p for p in parts if p)}")
    for key, want in expected.items():
        got = state[key]
        if got.layout != torch.strided or got.is_quantized:
            raise UserError(f"{weights_path}: tensor {key!r} is {got.layout}, expected a dense tensor")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise UserError(f"{weights_path}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, but the model in "
                            f"{description_path} needs {want.dtype} {tuple(want.shape)}")


#: dtypes a preparation tensor may have (declared by name in model.json).
_PREPARED_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}


def _apply_preparation(description: dict[str, Any], model: GenerativeModel, description_path: Path,
                       weights_bytes: int) -> None:
    """Create the preparation model.json declares on ``model``, so that weights.pt can be
    checked against it (errors name the key 'prepared').

    Declared sizes are checked against weights.pt's size before anything is allocated: a
    hostile description cannot make the loader allocate more than the file could hold.
    """
    prepared = description.get("prepared")
    if prepared is None:
        return
    where = f"{description_path}: key 'prepared'"
    if (not isinstance(prepared, dict) or set(prepared) != {"tensors", "values"}
            or not isinstance(prepared["tensors"], dict) or not isinstance(prepared["values"], dict)):
        raise UserError(f"{where} must be an object with keys 'tensors' and 'values'; re-save the model")
    tensors: dict[str, Any] = {}
    need = 0
    for name, spec in prepared["tensors"].items():
        ok = (isinstance(name, str) and name.isidentifier() and isinstance(spec, dict)
              and spec.get("dtype") in _PREPARED_DTYPES and isinstance(spec.get("shape"), list)
              and all(type(d) is int and 0 <= d < 1 << 40 for d in spec["shape"]))
        if not ok:
            raise UserError(f"{where}: tensor {show(name)} needs a name, a known dtype and a shape, "
                            f"got {show(spec)}")
        dtype = _PREPARED_DTYPES[spec["dtype"]]
        numel = 1
        for d in spec["shape"]:
            numel *= d
        need += numel * torch.empty((), dtype=dtype).element_size()
        if need > weights_bytes + _WEIGHTS_SLACK_BYTES:
            raise UserError(f"{where}: declares more tensor bytes than {WEIGHTS} holds ({weights_bytes})")
        tensors[name] = (tuple(spec["shape"]), dtype)
    for name in prepared["values"]:
        if not (isinstance(name, str) and name.isidentifier()) or name in tensors:
            raise UserError(f"{where}: value name {show(name)} must be an identifier and not a tensor's")
    try:
        model.load_preparation({**{k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in tensors.items()},
                                **prepared["values"]})
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{where}: refused by the model: {_first_line(exc)}") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[GenerativeModel, Detector, dict]:
    """Rebuild a saved model without unpickling code; UserError on anything unexpected."""
    model_dir = Path(model_dir)
    description = read_description(model_dir)
    description_path, weights_path = model_dir / MODEL_JSON, model_dir / WEIGHTS
    detector = _detector(description, description_path)
    try:
        weights_bytes = weights_path.stat().st_size
    except OSError as exc:
        raise UserError(f"{weights_path}: cannot be read ({exc.strerror or _first_line(exc)})") from None
    model = _build(description, detector, description_path, weights_bytes)
    _apply_preparation(description, model, description_path, weights_bytes)
    expected_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weights_bytes > 2 * expected_bytes + _WEIGHTS_SLACK_BYTES:
        raise UserError(f"{weights_path}: {weights_bytes} bytes, but the model in {description_path} has only "
                        f"{expected_bytes} bytes of weights; the file does not belong to this model")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{weights_path}: refused to load: the file is not a plain tensor state_dict "
            f"(it may carry pickled code). calotune only loads weights with "
            f"torch.load(weights_only=True). Detail: {_first_line(exc)}"
        ) from None
    except _LOAD_ERRORS as exc:
        raise UserError(
            f"{weights_path}: refused to load: not a readable torch state_dict (truncated or not written by "
            f"torch.save; calotune only loads weights with torch.load(weights_only=True)). "
            f"Detail: {_first_line(exc)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{weights_path}: expected a dict of tensors (a state_dict)")
    _check_state(state, model, weights_path, description_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights_path}: weights do not match the model in {description_path}: "
                        f"{_first_line(exc)}") from None
    model.to(device).eval()
    return model, detector, description
