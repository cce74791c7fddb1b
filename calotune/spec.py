"""Search-space YAML -> a validated, typed :class:`SearchSpec`.

Types are declared, never inferred from values (an int range [1, 4] must not silently
become a two-way categorical, as seen in research HPO code). Every error names the file,
the key, the rule and the value, following Optuna's style: "`low <= high` must hold, but
got (low=0.01, high=0.0001)".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calotune.errors import UserError

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

#: Parameters the trainer consumes; every other parameter goes to the model's Config.
TRAINER_PARAMS = frozenset({"batch_size"})

_TOP_KEYS = {
    "name", "description", "family", "detector", "geometry", "data", "objective",
    "objectives", "select", "budget", "scheduler", "resources", "params", "fixed",
}
_PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when", "default"},
    "int": {"type", "low", "high", "log", "step", "when", "default"},
    "categorical": {"type", "choices", "when", "default"},
}


@dataclass(frozen=True)
class Param:
    """One tunable parameter. ``when`` makes it conditional on a categorical parent."""

    name: str
    type: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, Any] = field(default_factory=dict)
    default: Any = None

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial (or Tune's captor of one) for this parameter's value."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_categorical(self.name, list(self.choices))

    def project(self, value: Any) -> Any:
        """The point of this parameter's domain nearest to ``value`` (the family default may
        lie outside the declared space; the baseline trial must still be a point of it)."""
        if self.type == "categorical":
            if value in self.choices:
                return value
            numeric = [c for c in self.choices if isinstance(c, int | float) and not isinstance(c, bool)]
            if isinstance(value, int | float) and not isinstance(value, bool) and numeric:
                return min(numeric, key=lambda c: abs(c - value))
            return self.choices[0]
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            value = self.low
        value = min(max(value, self.low), self.high)
        if self.step:
            value = self.low + round((value - self.low) / self.step) * self.step
            value = min(value, self.high)
        return round(value) if self.type == "int" else float(value)

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the parameter exists given the values already chosen for its parents."""
        return all(values.get(parent) == want for parent, want in self.when.items())


@dataclass(frozen=True)
class Objective:
    """A score to optimise: a key of the detector's objectives, or generation time."""

    metric: str
    mode: str  # "min" | "max"


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space: what to search, on what, how, with what resources."""

    name: str
    source: str
    family: str
    detector: str
    geometry: dict[str, Any]
    data: dict[str, Any]
    objectives: tuple[Objective, ...]
    select: str
    trials: int
    max_epochs: int
    scheduler: dict[str, Any]
    resources: dict[str, Any]
    params: tuple[Param, ...]
    fixed: dict[str, Any]

    @property
    def objective(self) -> Objective:
        """The first (for single-objective searches the only) objective."""
        return self.objectives[0]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run space for Optuna: conditional parameters only when active."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def defaults(self, model_defaults: dict[str, Any]) -> dict[str, Any]:
        """The default configuration as a point of this space (the baseline trial).

        A parameter's ``default`` in the YAML wins; otherwise the family's Config default.
        """
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            value = p.default if p.default is not None else model_defaults.get(p.name)
            values[p.name] = p.project(value)
        return values


def _fail(where: str, key: str, message: str) -> UserError:
    return UserError(f"{where}: {key}: {message}")


def resolve_space_path(name_or_path: str) -> Path:
    """A search-space name in search_spaces/ or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or "/" in name_or_path:
        if not candidate.is_file():
            raise UserError(f"search space file {name_or_path} does not exist")
        return candidate
    path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise UserError(
            f"unknown search space {name_or_path!r}; known: {', '.join(known)} "
            f"(or pass a path to a YAML file)"
        )
    return path


def load_spec(name_or_path: str) -> SearchSpec:
    """Load and validate a search space by name or path."""
    path = resolve_space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_spec(raw, source=str(path), default_name=path.stem)


def _number(where: str, key: str, value: Any, kind: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, key, f"must be a number, but got {value!r}")
    if kind == "int" and not float(value).is_integer():
        raise _fail(where, key, f"must be an integer for an int parameter, but got {value!r}")
    if not math.isfinite(value):
        raise _fail(where, key, f"must be finite, but got {value!r}")
    return int(value) if kind == "int" else float(value)


def _parse_param(where: str, name: str, raw: Any, known: dict[str, Param]) -> Param:
    key = f"params.{name}"
    if not isinstance(raw, dict):
        raise _fail(where, key, f"must be a mapping with a 'type', but got {raw!r}")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in _PARAM_KEYS:
        raise _fail(where, f"{key}.type", f"must be one of float, int, categorical, but got {kind!r}")
    unknown = sorted(str(k) for k in set(raw) - _PARAM_KEYS[kind])
    if unknown:
        raise _fail(
            where, key,
            f"unknown key(s) {unknown} for a {kind} parameter; allowed: {sorted(_PARAM_KEYS[kind])}",
        )
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(where, f"{key}.when", f"must map a parent parameter to a value, got {when!r}")
    for parent, want in when.items():
        if parent not in known:
            raise _fail(
                where, f"{key}.when",
                f"refers to unknown parent parameter {parent!r}; a parent must be a "
                f"categorical parameter declared above it (declared so far: {sorted(known)})",
            )
        if known[parent].type != "categorical" or want not in known[parent].choices:
            raise _fail(
                where, f"{key}.when",
                f"{parent}={want!r} is not one of the choices of categorical parameter "
                f"{parent!r} ({list(known[parent].choices)})",
            )
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(where, f"{key}.choices", f"must be a non-empty list, but got {choices!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise _fail(where, f"{key}.choices", f"must not repeat values, but got {choices!r}")
        if any(not isinstance(c, str | int | float | bool) or c is None for c in choices):
            raise _fail(where, f"{key}.choices", f"must hold numbers, strings or booleans: {choices!r}")
        default = raw.get("default")
        if default is not None and default not in choices:
            raise _fail(where, f"{key}.default", f"{default!r} is not one of {choices}")
        return Param(name, kind, choices=tuple(choices), when=dict(when), default=default)
    for bound in ("low", "high"):
        if bound not in raw:
            raise _fail(where, key, f"a {kind} parameter needs '{bound}'")
    low = _number(where, f"{key}.low", raw["low"], kind)
    high = _number(where, f"{key}.high", raw["high"], kind)
    if low > high:
        raise _fail(where, key, f"`low <= high` must hold, but got (low={low}, high={high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(where, f"{key}.log", f"must be true or false, but got {log!r}")
    if log and low <= 0:
        raise _fail(where, key, f"a log-scale parameter needs `low > 0`, but got low={low}")
    step = raw.get("step")
    if step is not None:
        step = _number(where, f"{key}.step", step, kind)
        if step <= 0:
            raise _fail(where, f"{key}.step", f"must be > 0, but got {step}")
        if log:
            raise _fail(where, key, "`step` and `log: true` cannot be combined (Optuna's rule)")
    default = raw.get("default")
    if default is not None:
        default = _number(where, f"{key}.default", default, kind)
        if not low <= default <= high:
            raise _fail(where, f"{key}.default", f"{default} is outside [low={low}, high={high}]")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=dict(when), default=default)


def _section(where: str, raw: dict, key: str, allowed: dict[str, type | tuple]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(where, key, f"must be a mapping, but got {value!r}")
    for k, v in value.items():
        if k not in allowed:
            raise _fail(where, f"{key}.{k}", f"unknown key; allowed: {sorted(allowed)}")
        if isinstance(v, bool) and bool not in (allowed[k] if isinstance(allowed[k], tuple) else (allowed[k],)):
            raise _fail(where, f"{key}.{k}", f"must be {_type_name(allowed[k])}, but got {v!r}")
        if not isinstance(v, allowed[k]):
            raise _fail(where, f"{key}.{k}", f"must be {_type_name(allowed[k])}, but got {v!r}")
    return dict(value)


def _type_name(t: type | tuple) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        dict: "a mapping"}.get(x, x.__name__) for x in types)


def parse_spec(raw: Any, source: str, default_name: str = "search") -> SearchSpec:
    """Validate a parsed YAML document; ``source`` is named in every error."""
    from calotune.detectors import detector_names, get_detector
    from calotune.models.registry import config_fields, family_names

    where = source
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the file must hold a mapping of keys, but got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(where, unknown[0], f"unknown key; allowed top-level keys: {sorted(_TOP_KEYS)}")
    for key in ("family", "detector", "params"):
        if key not in raw:
            raise _fail(where, key, "is required")
    family, detector_name = raw["family"], raw["detector"]
    if not isinstance(family, str) or family not in family_names():
        raise _fail(where, "family", f"unknown model family {family!r}; known: {family_names()}")
    if not isinstance(detector_name, str) or detector_name not in detector_names():
        raise _fail(where, "detector", f"unknown detector {detector_name!r}; known: {detector_names()}")
    geometry = _section(where, raw, "geometry", {k: (int, float) for k in _geometry_keys(detector_name)})
    detector = get_detector(detector_name, **geometry)

    data = _section(where, raw, "data", {"events": int, "seed": int, "particle": str, "mode": str,
                                          "validation_fraction": float, "test_fraction": float,
                                          "validation_events": int})
    for frac in ("validation_fraction", "test_fraction"):
        if frac in data and not 0.0 < data[frac] < 0.5:
            raise _fail(where, f"data.{frac}", f"must be in (0, 0.5), but got {data[frac]}")

    allowed_objectives = {**detector.objectives(), "gen_time_ms": "min"}
    objectives = _parse_objectives(where, raw, allowed_objectives)
    select = raw.get("select", "first")
    if not isinstance(select, str):
        raise _fail(where, "select", f"must be a string, but got {select!r}")
    if len(objectives) > 1 and select not in {"first", "knee"} | {o.metric for o in objectives}:
        raise _fail(where, "select", f"must be 'first', 'knee' or an objective name, but got {select!r}")

    budget = _section(where, raw, "budget", {"trials": int, "max_epochs": int})
    for key, value in budget.items():
        if value < 1:
            raise _fail(where, f"budget.{key}", f"must be >= 1, but got {value}")
    scheduler = _section(where, raw, "scheduler", {"type": str, "grace_period": int,
                                                    "reduction_factor": int})
    if not isinstance(scheduler.get("type", "asha"), str) or scheduler.get("type", "asha") not in {"asha", "none"}:
        raise _fail(where, "scheduler.type", f"must be 'asha' or 'none', but got {scheduler['type']!r}")
    if scheduler.get("reduction_factor", 2) < 2:
        raise _fail(where, "scheduler.reduction_factor", f"must be >= 2, got {scheduler['reduction_factor']}")
    if scheduler.get("grace_period", 1) < 1:
        raise _fail(where, "scheduler.grace_period", f"must be >= 1, got {scheduler['grace_period']}")
    resources = _section(where, raw, "resources", {"cpus_per_trial": (int, float), "gpus_per_trial": (int, float),
                                                    "workers_per_trial": int, "max_concurrent_trials": int})
    for key, value in resources.items():
        if value < 0 or (key in {"workers_per_trial", "max_concurrent_trials"} and value < 1):
            raise _fail(where, f"resources.{key}", f"must be positive, but got {value}")

    model_fields = config_fields(family)
    raw_params = raw["params"]
    if not isinstance(raw_params, dict) or not raw_params:
        raise _fail(where, "params", f"must be a non-empty mapping of parameters, but got {raw_params!r}")
    params: dict[str, Param] = {}
    for name, spec in raw_params.items():
        if not isinstance(name, str) or (name not in model_fields and name not in TRAINER_PARAMS):
            raise _fail(
                where, f"params.{name}",
                f"is not a parameter of model family {family!r} nor of the trainer; "
                f"known: {sorted(set(model_fields) | TRAINER_PARAMS)}",
            )
        params[name] = _parse_param(where, name, spec, params)
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(where, "fixed", f"must be a mapping of parameter -> value, but got {fixed!r}")
    for name in fixed:
        if not isinstance(name, str) or (name not in model_fields and name not in TRAINER_PARAMS):
            raise _fail(where, f"fixed.{name}", f"is not a parameter of {family!r} nor of the trainer")
        if name in params:
            raise _fail(where, f"fixed.{name}", "is also declared under params; keep one")

    return SearchSpec(
        name=str(raw.get("name", default_name)),
        source=source,
        family=family,
        detector=detector_name,
        geometry=geometry,
        data=data,
        objectives=objectives,
        select=str(select),
        trials=budget.get("trials", 12),
        max_epochs=budget.get("max_epochs", 8),
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2, **scheduler},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0, "workers_per_trial": 1, **resources},
        params=tuple(params.values()),
        fixed=dict(fixed),
    )


def _geometry_keys(detector_name: str) -> list[str]:
    from calotune.detectors import get_detector

    return list(get_detector(detector_name).geometry_dict())


def _parse_objectives(where: str, raw: dict, allowed: dict[str, str]) -> tuple[Objective, ...]:
    if "objective" in raw and "objectives" in raw:
        raise _fail(where, "objectives", "give either 'objective' or 'objectives', not both")
    items = raw.get("objectives") if "objectives" in raw else [raw.get("objective", "mean_separation")]
    if not isinstance(items, list) or not items:
        raise _fail(where, "objectives", f"must be a non-empty list, but got {items!r}")
    out = []
    for i, item in enumerate(items):
        key = "objective" if "objectives" not in raw else f"objectives[{i}]"
        if isinstance(item, str):
            item = {"metric": item}
        if not isinstance(item, dict) or set(item) - {"metric", "mode"} or "metric" not in item:
            raise _fail(where, key, f"must be a metric name or {{metric, mode}}, but got {item!r}")
        metric = item["metric"]
        if not isinstance(metric, str) or metric not in allowed:
            raise _fail(where, key, f"unknown objective {metric!r}; known: {sorted(allowed)}")
        mode = item.get("mode", allowed[metric])
        if not isinstance(mode, str) or mode not in {"min", "max"}:
            raise _fail(where, f"{key}.mode", f"must be 'min' or 'max', but got {mode!r}")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise _fail(where, "objectives", "lists the same metric twice")
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m calotune.spec SPACE...``: validate search spaces without running anything."""
    import argparse
    import logging

    from calotune.cli import configure_logging, run_cli

    parser = argparse.ArgumentParser(prog="python -m calotune.spec", description=main.__doc__)
    parser.add_argument("spaces", nargs="+", help="names in search_spaces/ or YAML paths")
    args = parser.parse_args(argv)
    configure_logging()

    def body() -> int:
        for name in args.spaces:
            spec = load_spec(name)
            logging.getLogger("calotune.spec").info(
                "%s: ok (%s on %s, %d parameters, objectives %s, %d trials x %d epochs)", spec.source,
                spec.family, spec.detector, len(spec.params), ", ".join(o.metric for o in spec.objectives),
                spec.trials, spec.max_epochs)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
