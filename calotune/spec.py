"""Search-space YAML -> a validated, typed :class:`SearchSpec`.

Types are declared, never inferred from values (an int range [1, 4] must not silently
become a two-way categorical, as seen in research HPO code). Every error names the file,
the key, the rule and the value, following Optuna's style: "`low <= high` must hold, but
got (low=0.01, high=0.0001)".
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml

from calotune.errors import UserError

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer's own tunable parameters, with their rules declared as a family's Config
    declares them (metadata bounds, see :func:`calotune.models.base.bounded`)."""

    batch_size: int = field(default=128, metadata={"gt": 0})
    """Events per optimisation step (calotune.tuning.worker); 0 would never step."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training arithmetic: "bf16" runs each training step under ``torch.autocast`` in
    bfloat16 (about 2x the matrix throughput of fp32 on recent GPUs, no loss scaling
    needed as its exponent range is fp32's); backward and validation stay fp32."""
    compile: bool = False
    """``torch.compile`` each of the model's sub-networks once per trial: faster steps on a
    GPU after a compile that takes seconds to minutes, so worth it for trials of minutes."""


#: Parameters the trainer consumes; every other parameter goes to the model's Config.
TRAINER_PARAMS = frozenset(f.name for f in fields(TrainerConfig))

#: A search space is a page of YAML; 64 KiB is far beyond any real one and bounds the
#: work a hostile file can cause before it is refused.
MAX_SPACE_BYTES = 64 * 1024
#: Nesting a search space needs: file > params > parameter > when/choices is 4 levels.
MAX_YAML_DEPTH = 16
#: Longest scalar (a description, a string choice); also keeps integer parsing cheap.
MAX_SCALAR_CHARS = 4096
#: Integers beyond 2**53 lose precision as floats, which Optuna stores them as.
MAX_INT = 2**53
#: ``name`` becomes part of file and run names (``<home>/searches/<name>.latest``).
MAX_NAME_CHARS = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
#: Fewest events any split (train, validation, test) may get. Scores are separation
#: powers over 50-bin histograms: with N events per sample, two samples of the same
#: distribution already score about n_bins / (2 N), half the [0, 1] scale at N = 50, so a
#: smaller validation or test split cannot rank configurations (and a train split that
#: small cannot fill a batch of a typical size).
MIN_SPLIT_EVENTS = 50
#: Used when the space does not say (calotune.search applies the same values).
DEFAULT_EVENTS = 6000
DEFAULT_VALIDATION_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
#: Validation events scored per epoch, at most. Two samples of one distribution score a
#: separation power of about n_bins / (2 N) over 50-bin histograms (see MIN_SPLIT_EVENTS):
#: 0.0025 at N = 10 000, well below the 0.01-0.1 that separates configurations, while a
#: CaloChallenge-sized validation split (15 % of 100 000+ events) would make generating and
#: scoring it the dominant cost of a short epoch. The test split is always scored whole.
DEFAULT_VALIDATION_EVENTS = 10_000
#: Ray's resolution for fractional resources: a nonzero request below it is refused.
RESOURCE_PRECISION = 1e-4
#: Most family configurations built to check a space's corners and pairs of corners;
#: a real space needs a few hundred, and this bounds what a hostile one can ask for.
MAX_DOMAIN_CHECKS = 20_000

_TOP_KEYS = {
    "name", "description", "family", "detector", "geometry", "data", "objective",
    "objectives", "select", "budget", "scheduler", "resources", "params", "fixed",
    "base_model", "train_phases", "sampler",
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
class DataSpec:
    """``data``: the built-in synthetic sample (used without --data) and the split."""

    events: int = DEFAULT_EVENTS
    seed: int = 1
    synthesis: dict[str, Any] = field(default_factory=dict)
    """Options of the detector's synthetic showers (ZDC: particle, mode), checked by it."""
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    validation_events: int = DEFAULT_VALIDATION_EVENTS
    """Most validation events a trial generates and scores per epoch (a fixed random
    subset of the validation split when it is larger; see DEFAULT_VALIDATION_EVENTS)."""


@dataclass(frozen=True)
class SchedulerSpec:
    """``scheduler``: which Tune scheduler stops trials early, and its rungs
    (:mod:`calotune.tuning.algorithms`; ``type: none`` runs every trial to the end)."""

    type: str = "asha"
    grace_period: int = 2
    reduction_factor: int = 2
    data_fractions: tuple[float, ...] | None = None
    """Data size as a fidelity (asha, moasha): the fraction of the training events a trial
    trains on up to its first rung, then up to the next, ...; the last is 1. None: all."""
    # Population-based training (calotune.tuning.pbt, Jaderberg et al. arXiv 1711.09846).
    # Read when the search runs pbt (``type: pbt`` or ``--scheduler pbt``).
    perturbation_interval: int = 2
    """pbt: epochs between two exploit/explore steps of a trial."""
    quantile_fraction: float = 0.25
    """pbt: the bottom fraction of the population copies a trial of the top fraction."""
    resample_probability: float = 0.25
    """pbt: chance that explore redraws a mutated parameter from its domain."""
    mutate: tuple[str, ...] = ()
    """pbt: the parameters explore perturbs (ones that leave the weights' shapes alone)."""
    synch: bool = False
    """pbt: the whole population waits at each perturbation epoch and is ranked together
    (Ray's synchronous PBT); False: each trial is ranked when it gets there (the paper's)."""

    def __repr__(self) -> str:
        # Without data fractions or PBT settings, the repr of the fields every search had
        # before they existed: it enters the space hash that a resumed search must match.
        extra = f", data_fractions={self.data_fractions!r}" if self.data_fractions else ""
        if self.type == "pbt" or self.mutate:
            extra += (f", perturbation_interval={self.perturbation_interval!r}, quantile_fraction="
                      f"{self.quantile_fraction!r}, resample_probability={self.resample_probability!r}, "
                      f"mutate={self.mutate!r}" + (", synch=True" if self.synch else ""))
        return (f"SchedulerSpec(type={self.type!r}, grace_period={self.grace_period!r}, "
                f"reduction_factor={self.reduction_factor!r}{extra})")


@dataclass(frozen=True)
class SamplerSpec:
    """``sampler``: which Optuna sampler proposes the trials (:mod:`calotune.tuning.algorithms`).

    ``multivariate`` (TPE only): model the parameters jointly, with ``group`` keeping
    conditional branches apart.
    """

    type: str = "tpe"
    multivariate: bool = False
    group: bool = True
    n_startup_trials: int | None = None
    """tpe, gp, cmaes: random trials before the sampler models the results (warm-start
    trials count); None: Optuna's default (10 for TPE and GP, 1 for CMA-ES). A third of
    the budget was tried as the default and did worse at 10 trials (benchmarks/README.md)."""


@dataclass(frozen=True)
class ResourceSpec:
    """``resources``: what one trial asks the Ray cluster for."""

    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    workers_per_trial: int = 1
    max_concurrent_trials: int | None = None
    """At most this many trials at once (None: as many as the cluster holds)."""
    checkpoint_every_s: float | None = None
    """Longest training time between two checkpoints of a trial (None: 60 s; 0: every epoch);
    besides these, a trial checkpoints where its scheduler decides (calotune.tuning.checkpointing)."""

    def as_record(self) -> dict[str, Any]:
        """The set fields, for records (MLflow params, the resume check)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space: what to search, on what, how, with what resources."""

    name: str
    source: str
    family: str
    detector: str
    geometry: dict[str, Any]
    data: DataSpec
    objectives: tuple[Objective, ...]
    select: str
    trials: int
    max_epochs: int
    scheduler: SchedulerSpec
    resources: ResourceSpec
    params: tuple[Param, ...]
    fixed: dict[str, Any]
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    #: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: search on a registered model
    #: instead of training from scratch (see :func:`_check_base_model`).
    base_model: str | None = None
    #: With ``base_model``: the phases retrained on it; () for a sampling-only search.
    train_phases: tuple[str, ...] | None = None

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


#: The ``scheduler`` keys of population-based training (:mod:`calotune.tuning.pbt`).
PBT_KEYS = frozenset({"perturbation_interval", "quantile_fraction", "resample_probability", "mutate", "synch"})


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


class _RefusedYAML(Exception):
    """A YAML construct a search space does not allow; the message starts with the key or
    the line, as the file's name will be put in front of it."""


class _SpaceLoader(yaml.SafeLoader):
    """PyYAML's safe loader without the features that let a small file cost a lot.

    Anchors and aliases are refused (a search space never needs them, and alias
    expansion is how "billion laughs" files blow up); nesting is bounded before the
    recursive composer descends (deep nesting otherwise ends in RecursionError); long
    scalars are refused (a huge integer literal is parsed in quadratic time).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedYAML(f"line {line}: alias *{event.anchor} is not allowed in a search space; "
                                     "write the value out")
        if getattr(event, "anchor", None) is not None:
            raise _RefusedYAML(f"line {line}: anchor &{event.anchor} is not allowed in a search space; "
                                     "write the value out where it is used")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
            raise _RefusedYAML(f"line {line}: a value of {len(event.value)} characters is longer than "
                                     f"the {MAX_SCALAR_CHARS} a search space allows")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _RefusedYAML(f"line {line}: nesting deeper than {MAX_YAML_DEPTH} levels is not "
                                         "allowed in a search space")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _key_text(loader: _SpaceLoader, node: yaml.Node) -> tuple[Any, str]:
    """A mapping key as a comparable value (``1`` and ``0x1`` are the same key) and as text."""
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_object(node)
        try:
            hash(value)
        except TypeError:
            return (node.tag, node.value), node.value
        return (type(value).__name__, value), str(value)
    return (node.tag, id(node)), f"<{node.tag.rsplit(':', 1)[-1]} at line {node.start_mark.line + 1}>"


def _refuse_duplicates(loader: _SpaceLoader, root: yaml.Node) -> None:
    """Refuse a mapping that repeats a key (PyYAML keeps the last one silently), and merge
    keys (``<<``), which also let a later value replace an earlier one unseen."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _RefusedYAML(f"{path or 'top level'}: merge key << at line {line} is not "
                                       "allowed in a search space; write the keys out")
                key, text = _key_text(loader, key_node)
                dotted = f"{path}.{text}" if path else text
                if key in seen:
                    raise _RefusedYAML(f"{dotted}: duplicate key at line {line} (first at line "
                                       f"{seen[key]}); YAML would silently keep only the last "
                                       "one, so remove one of them")
                seen[key] = line
                stack.append((value_node, dotted))


def read_space_yaml(path: Path) -> Any:
    """Parse a search-space file; every way it can be unreadable or hostile is a UserError.

    The file is read with a size bound, decoded as UTF-8, composed by
    :class:`_SpaceLoader` (no anchors or aliases, bounded depth and scalar length),
    checked for duplicate and merge keys, and only then turned into Python objects.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPACE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the search space: {exc.strerror or exc}") from None
    if len(data) > MAX_SPACE_BYTES:
        raise UserError(f"{path}: a search space must be at most {MAX_SPACE_BYTES} bytes, but "
                        f"the file is larger")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    loader: _SpaceLoader | None = None
    try:
        loader = _SpaceLoader(text)  # its reader already refuses unprintable characters
        root = loader.get_single_node()
        if root is None:
            return None
        _refuse_duplicates(loader, root)
        return loader.construct_document(root)
    except _RefusedYAML as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a date like 2024-13-45
        raise UserError(f"{path}: malformed YAML: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_spec(name_or_path: str) -> SearchSpec:
    """Load and validate a search space by name or path."""
    path = resolve_space_path(name_or_path)
    return parse_spec(read_space_yaml(path), source=str(path), default_name=path.stem)


def _number(where: str, key: str, value: Any, kind: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, key, f"must be a number, but got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, key, f"must be finite, but got {value!r}")
    if kind == "int" and isinstance(value, float) and not value.is_integer():
        raise _fail(where, key, f"must be an integer for an int parameter, but got {value!r}")
    if abs(value) > MAX_INT:
        raise _fail(where, key, f"must be at most 2**53 in magnitude, but got {_show(value)}")
    return int(value) if kind == "int" else float(value)


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} characters)"


def _key(key: Any, limit: int = 60) -> str:
    """A key as it appears in a message, shortened like :func:`_show`."""
    text = str(key)
    return text if len(text) <= limit else f"{text[: limit // 2]}...({len(text)} characters)"


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type: YAML's ``1`` is not the choice ``true``."""
    return type(a) is type(b) and a == b


def _check_step(where: str, key: str, low: float | int, high: float | int, step: float | int) -> None:
    """Refuse a step that does not divide ``high - low``: Optuna would lower ``high`` to the
    last grid point without a word, so the space searched would not be the one written."""
    lo, hi, st = (Decimal(repr(v)) for v in (low, high, step))
    n = (hi - lo) // st
    if lo + n * st == hi:
        return
    below, above = lo + n * st, lo + (n + 1) * st
    nearest = below if hi - below <= above - hi else above
    fmt = int if isinstance(step, int) else float
    raise _fail(
        where, key,
        f"`step` must divide `high - low` (Optuna would silently search up to {fmt(below)} only), "
        f"but got (low={low}, high={high}, step={step}); the nearest valid high is {fmt(nearest)} "
        f"(valid highs around it: {fmt(below)}, {fmt(above)})",
    )


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
        if known[parent].type != "categorical" or not any(_same(want, c) for c in known[parent].choices):
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
        if default is not None and not any(_same(default, c) for c in choices):
            raise _fail(where, f"{key}.default", f"{_show(default)} is not one of {choices}")
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
        _check_step(where, key, low, high, step)
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
            raise _fail(where, f"{key}.{k}", f"must be {_type_name(allowed[k])}, but got {_show(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail(where, f"{key}.{k}", f"must be finite, but got {v!r}")
        if isinstance(v, int) and abs(v) > MAX_INT:
            raise _fail(where, f"{key}.{k}", f"must be at most 2**53 in magnitude, but got {_show(v)}")
    return dict(value)


def _type_name(t: type | tuple) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        dict: "a mapping", list: "a list"}.get(x, x.__name__) for x in types)


def check_name(name: Any, where: str, from_file_name: bool = False) -> str:
    """Refuse a search name that is unsafe in file and run names (``<name>.latest``)."""
    origin = " (taken from the file name; add a `name:` key)" if from_file_name else ""
    if not isinstance(name, str):
        raise _fail(where, "name", f"must be a string, but got {_show(name)}")
    if not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise _fail(
            where, "name",
            f"must be 1 to {MAX_NAME_CHARS} letters, digits or `_.-`, not starting with a dot "
            f"(it names files and runs), but got {_show(name)}{origin}",
        )
    return name


def split_sizes(n_events: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) event counts, as :func:`calotune.data.splits.split` cuts them."""
    n_val = max(1, round(n_events * validation_fraction))
    n_test = max(1, round(n_events * test_fraction))
    return n_events - n_val - n_test, n_val, n_test


def min_split_events(validation_fraction: float, test_fraction: float) -> int:
    """The fewest events that give every split at least MIN_SPLIT_EVENTS events."""
    smallest = min(validation_fraction, test_fraction, 1 - validation_fraction - test_fraction)
    n = max(3 * MIN_SPLIT_EVENTS, math.floor((MIN_SPLIT_EVENTS - 0.5) / smallest))
    while min(split_sizes(n, validation_fraction, test_fraction)) < MIN_SPLIT_EVENTS:
        n += 1  # a handful of steps at most: the estimate is off by rounding only
    return n


def check_split_events(n_events: int, validation_fraction: float, test_fraction: float,
                       where: str, key: str = "data.events") -> None:
    """Refuse an event count whose train, validation or test split would get fewer than
    MIN_SPLIT_EVENTS events; UserError "{where}: {key}: ...". calotune.search can call it
    for ``--events`` and for the size of a ``--data`` file."""
    sizes = split_sizes(n_events, validation_fraction, test_fraction)
    if min(sizes) >= MIN_SPLIT_EVENTS:
        return
    train, val, test = sizes
    raise _fail(
        where, key,
        f"each split needs at least {MIN_SPLIT_EVENTS} events (MIN_SPLIT_EVENTS), but "
        f"{n_events} events give train={train}, validation={val}, test={test} "
        f"(validation_fraction={validation_fraction}, test_fraction={test_fraction}); use at "
        f"least {min_split_events(validation_fraction, test_fraction)} events",
    )


def check_resources(resources: dict[str, Any], where: str) -> None:
    """Refuse resource requests that Ray refuses, or that break calotune later (0 CPUs
    divides by zero when threads are set). Keys as in the ``resources`` section."""
    for key, value in resources.items():
        name = f"resources.{key}"
        if key in {"workers_per_trial", "max_concurrent_trials"}:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(where, name, f"must be a positive integer (>= 1), but got {_show(value)}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _fail(where, name, f"must be a finite number, but got {_show(value)}")
        if key == "cpus_per_trial" and not value > 0:
            raise _fail(where, name, f"must be positive (> 0), but got {value}")
        if key in {"gpus_per_trial", "checkpoint_every_s"} and value < 0:
            raise _fail(where, name, f"must be >= 0, but got {value}")
        if key == "checkpoint_every_s":
            continue
        if 0 < value < RESOURCE_PRECISION:
            raise _fail(where, name, f"must be 0 or at least {RESOURCE_PRECISION} (Ray's resolution "
                                     f"for fractional resources), but got {value}")
        if key == "gpus_per_trial" and value > 1 and not float(value).is_integer():
            raise _fail(where, name, f"a GPU request above 1 must be a whole number (Ray's rule), "
                                     f"but got {value}; use {math.floor(value)} or {math.ceil(value)}")


def parse_spec(raw: Any, source: str, default_name: str = "search") -> SearchSpec:
    """Validate a parsed YAML document; ``source`` is named in every error.

    Beyond the shape of the file, the whole declared domain is checked against the
    family's Config and the trainer's parameters (see :func:`_check_domain`), so that a
    space that loads is one every trial can run.
    """
    from calotune.detectors import detector_names, get_detector
    from calotune.models.registry import config_fields, family_names

    where = source
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the file must hold a mapping of keys, but got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(where, _key(unknown[0]), f"unknown key; allowed top-level keys: {sorted(_TOP_KEYS)}")
    name = check_name(raw["name"], where) if "name" in raw else check_name(default_name, where, True)
    if not isinstance(raw.get("description", ""), str):
        raise _fail(where, "description", f"must be a string, but got {_show(raw['description'])}")
    for key in ("family", "detector", "params"):
        if key not in raw:
            raise _fail(where, key, "is required")
    family, detector_name = raw["family"], raw["detector"]
    if not isinstance(family, str) or family not in family_names():
        raise _fail(where, "family", f"unknown model family {_show(family)}; known: {family_names()}")
    if not isinstance(detector_name, str) or detector_name not in detector_names():
        raise _fail(where, "detector", f"unknown detector {_show(detector_name)}; known: {detector_names()}")
    _check_pairing(where, family, detector_name)
    geometry = _section(where, raw, "geometry", {k: (int, float) for k in _geometry_keys(detector_name)})
    try:
        detector = get_detector(detector_name, **geometry)
    except UserError as exc:
        raise _fail(where, "geometry", str(exc)) from None

    data = _section(where, raw, "data", {"events": int, "seed": int, "synthesis": dict,
                                          "validation_fraction": float, "test_fraction": float,
                                          "validation_events": int})
    if "validation_events" in data and data["validation_events"] < MIN_SPLIT_EVENTS:
        raise _fail(where, "data.validation_events", f"must be >= {MIN_SPLIT_EVENTS} (fewer cannot rank "
                                                     f"configurations), but got {data['validation_events']}")
    _check_synthesis(where, detector, data.get("synthesis", {}))
    for frac in ("validation_fraction", "test_fraction"):
        if frac in data and not 0.0 < data[frac] < 0.5:
            raise _fail(where, f"data.{frac}", f"must be in (0, 0.5), but got {data[frac]}")
    check_split_events(data.get("events", DEFAULT_EVENTS),
                       data.get("validation_fraction", DEFAULT_VALIDATION_FRACTION),
                       data.get("test_fraction", DEFAULT_TEST_FRACTION), where)

    allowed_objectives = {**detector.objectives(), "gen_time_ms": "min"}
    objectives = _parse_objectives(where, raw, allowed_objectives, default_objective(detector))
    select = raw.get("select", "first")
    if not isinstance(select, str):
        raise _fail(where, "select", f"must be a string, but got {_show(select)}")
    if "select" in raw and len(objectives) == 1:
        raise _fail(where, "select", f"chooses among several objectives, but the space has one "
                                     f"({objectives[0].metric}); remove `select: {_show(select)}`")
    if len(objectives) > 1 and select not in {"first", "knee"} | {o.metric for o in objectives}:
        raise _fail(where, "select", f"must be 'first', 'knee' or an objective name, but got {_show(select)}")

    budget = _section(where, raw, "budget", {"trials": int, "max_epochs": int})
    for key, value in budget.items():
        if value < 1:
            raise _fail(where, f"budget.{key}", f"must be >= 1, but got {value}")
    scheduler = _section(where, raw, "scheduler", {"type": str, "grace_period": int,
                                                    "reduction_factor": int, "data_fractions": list,
                                                    "perturbation_interval": int,
                                                    "quantile_fraction": (int, float),
                                                    "resample_probability": (int, float), "mutate": list,
                                                    "synch": bool})
    from calotune.tuning import algorithms

    scheduler.setdefault("type", algorithms.default_scheduler(len(objectives)))
    algorithms.check_scheduler(scheduler["type"], len(objectives), f"{where}: scheduler.type")
    # PBT draws its first population at random (or QMC): no model-based sampler behind it
    default_sampler = "random" if scheduler["type"] == "pbt" else algorithms.default_sampler(len(objectives))
    raw_sampler = raw.get("sampler", default_sampler)
    if isinstance(raw_sampler, str):
        raw_sampler = {"type": raw_sampler}
    if not isinstance(raw_sampler, dict):
        raise _fail(where, "sampler", f"must be a name (e.g. tpe) or a mapping with a type, but got "
                                      f"{_show(raw_sampler)}")
    sampler = _section(where, {"sampler": raw_sampler}, "sampler",
                       {"type": str, "multivariate": bool, "group": bool, "n_startup_trials": int})
    sampler.setdefault("type", default_sampler)
    if sampler["type"] != "tpe" and ({"multivariate", "group"} & set(sampler)):
        raise _fail(where, "sampler", f"multivariate and group are options of tpe, not of {sampler['type']!r}")
    if "n_startup_trials" in sampler:
        if sampler["type"] not in algorithms.STARTUP_SAMPLERS:
            raise _fail(where, "sampler.n_startup_trials", f"is an option of "
                        f"{', '.join(algorithms.STARTUP_SAMPLERS)}, not of {sampler['type']!r}")
        if sampler["n_startup_trials"] < 1:
            raise _fail(where, "sampler.n_startup_trials", f"must be >= 1, got {sampler['n_startup_trials']}")
    if scheduler.get("reduction_factor", 2) < 2:
        raise _fail(where, "scheduler.reduction_factor", f"must be >= 2, got {scheduler['reduction_factor']}")
    if scheduler.get("grace_period", 1) < 1:
        raise _fail(where, "scheduler.grace_period", f"must be >= 1, got {scheduler['grace_period']}")
    resources = _section(where, raw, "resources", {"cpus_per_trial": (int, float), "gpus_per_trial": (int, float),
                                                    "workers_per_trial": int, "max_concurrent_trials": int,
                                                    "checkpoint_every_s": (int, float)})
    check_resources(resources, where)

    model_fields = config_fields(family)
    raw_params = raw["params"]
    if not isinstance(raw_params, dict) or not raw_params:
        raise _fail(where, "params", f"must be a non-empty mapping of parameters, but got {_show(raw_params)}")
    params: dict[str, Param] = {}
    for pname, spec in raw_params.items():
        if not isinstance(pname, str) or (pname not in model_fields and pname not in TRAINER_PARAMS):
            raise _fail(
                where, f"params.{_key(pname)}",
                f"is not a parameter of model family {family!r} nor of the trainer; "
                f"known: {sorted(set(model_fields) | TRAINER_PARAMS)}",
            )
        params[pname] = _parse_param(where, pname, spec, params)
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(where, "fixed", f"must be a mapping of parameter -> value, but got {_show(fixed)}")
    for fname in fixed:
        if not isinstance(fname, str) or (fname not in model_fields and fname not in TRAINER_PARAMS):
            raise _fail(where, f"fixed.{_key(fname)}", f"is not a parameter of {family!r} nor of the trainer")
        if fname in params:
            raise _fail(where, f"fixed.{fname}", "is also declared under params; keep one")
    _check_domain(where, family, tuple(params.values()), dict(fixed))
    base_model, train_phases = _check_base_model(where, raw, family, [*params, *fixed], budget)
    algorithms.check_sampler(sampler["type"], len(objectives), tuple(params.values()), f"{where}: sampler")
    if "data_fractions" in scheduler:
        if train_phases == ():
            raise _fail(where, "scheduler.data_fractions", "a sampling-only search (base_model without "
                                                           "train_phases) trains nothing; remove data_fractions")
        scheduler["data_fractions"] = algorithms.check_data_fractions(
            scheduler["data_fractions"], scheduler["type"], scheduler.get("grace_period", SchedulerSpec.grace_period),
            scheduler.get("reduction_factor", SchedulerSpec.reduction_factor), budget.get("max_epochs", 8),
            f"{where}: scheduler.data_fractions")
    if scheduler["type"] == "pbt" or set(scheduler) & PBT_KEYS:
        from calotune.tuning import pbt

        scheduler.update(pbt.check_settings(scheduler, tuple(params.values()), dict(fixed), len(objectives),
                                            sampler["type"], budget.get("max_epochs", 8), where))

    return SearchSpec(
        name=name,
        source=source,
        family=family,
        detector=detector_name,
        geometry=geometry,
        data=DataSpec(**data),
        objectives=objectives,
        select=str(select),
        trials=budget.get("trials", 12),
        max_epochs=1 if train_phases == () else budget.get("max_epochs", 8),
        scheduler=SchedulerSpec(**scheduler),
        sampler=SamplerSpec(**sampler),
        resources=ResourceSpec(**resources),
        params=tuple(params.values()),
        fixed=dict(fixed),
        base_model=base_model,
        train_phases=train_phases,
    )


def _check_base_model(where: str, raw: dict, family: str, names: list[str], budget: dict[str, int]
                      ) -> tuple[str | None, tuple[str, ...] | None]:
    """``base_model`` / ``train_phases``: a search on a registered model of this family.

    Without ``train_phases`` it is a sampling-only search: no training, each trial scores
    the parent's weights under its sampling parameters, so the space may only name the
    family's ``SAMPLING_PARAMS`` (and ``budget.max_epochs`` is one round, if given). With
    ``train_phases`` only those phases are retrained on the parent's other parts, so the
    space may name those phases' ``PHASE_PARAMS``, the sampling parameters and the
    trainer's. Everything else comes from the parent, which is checked when the search
    is planned (its family, detector and phases).
    """
    from calotune.models.registry import get_family

    if "base_model" not in raw:
        if "train_phases" in raw:
            raise _fail(where, "train_phases", "retrains phases of a registered model, but no "
                                               "base_model names one; add base_model: models:/NAME@ALIAS")
        return None, None
    uri = raw["base_model"]
    if not isinstance(uri, str) or not re.fullmatch(r"models:/[^/@]+(@[\w.-]+|/\d+)", uri):
        raise _fail(where, "base_model", f"must be models:/NAME@ALIAS or models:/NAME/VERSION (e.g. "
                                         f"models:/calochallenge-1-photons@candidate), but got {_show(uri)}")
    module = get_family(family)
    sampling = tuple(getattr(module, "SAMPLING_PARAMS", ()))
    phase_params: dict[str, tuple[str, ...]] = dict(getattr(module, "PHASE_PARAMS", {}))
    phases_raw = raw.get("train_phases")
    if phases_raw is None:
        if not sampling:
            raise _fail(where, "base_model", f"model family {family!r} declares no sampling parameters "
                                             f"(SAMPLING_PARAMS), so a registered model of it cannot be "
                                             f"searched without training; add train_phases")
        if budget.get("max_epochs", 1) != 1:
            raise _fail(where, "budget.max_epochs", f"a sampling-only search (base_model without "
                                                    f"train_phases) trains nothing and scores each trial "
                                                    f"once; remove it (got {budget['max_epochs']})")
        phases: tuple[str, ...] = ()
        allowed = set(sampling)
        rule = f"a sampling-only search may vary only {family!r}'s sampling parameters {list(sampling)}"
    else:
        if (not isinstance(phases_raw, list) or not phases_raw
                or not all(isinstance(p, str) for p in phases_raw) or len(set(phases_raw)) != len(phases_raw)):
            raise _fail(where, "train_phases", f"must be a non-empty list of distinct phase names, but got "
                                               f"{_show(phases_raw)}")
        unknown = [p for p in phases_raw if p not in phase_params]
        if unknown:
            raise _fail(where, "train_phases", f"{unknown[0]!r} is not a phase {family!r} can retrain on a "
                                               f"registered model; its phases: {sorted(phase_params) or 'none'}")
        phases = tuple(phases_raw)
        allowed = set(sampling) | set(TRAINER_PARAMS) | {n for p in phases for n in phase_params[p]}
        rule = (f"retraining {list(phases)} may vary only those phases' parameters, the sampling "
                f"parameters and the trainer's: {sorted(allowed)}")
    for name in names:
        if name not in allowed:
            section = "params" if name in raw.get("params", {}) else "fixed"
            raise _fail(where, f"{section}.{name}", f"comes from the registered model: {rule}")
    return uri, phases


def _probes(p: Param) -> list[tuple[str, Any]]:
    """Values of a parameter that stand for its whole domain: every choice; both ends of a
    range (single-field rules are intervals, so the ends decide); every point of a small
    int grid, so that rules between fields that are not monotone (divisibility) are
    also met."""
    if p.type == "categorical":
        return [(f"choices[{i}]", c) for i, c in enumerate(p.choices)]
    step = p.step or 1
    if p.type == "int" and (p.high - p.low) // step < 8:
        return [("grid point", v) for v in range(int(p.low), int(p.high) + 1, int(step))]
    return [("low", p.low), ("high", p.high)]


def _requirements(p: Param, by_name: dict[str, Param]) -> dict[str, Any] | None:
    """Parent values that make ``p`` active (transitively); None if no assignment does."""
    required: dict[str, Any] = {}
    stack = [p]
    while stack:
        for parent, want in stack.pop().when.items():
            if parent in required and not _same(required[parent], want):
                return None
            required[parent] = want
            stack.append(by_name[parent])
    return required


def _merge(*assignments: dict[str, Any] | None) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for assignment in assignments:
        if assignment is None:
            return None
        for name, value in assignment.items():
            if name in out and not _same(out[name], value):
                return None
            out[name] = value
    return out


def _check_domain(where: str, family: str, params: tuple[Param, ...], fixed: dict[str, Any]) -> None:
    """Refuse a space any of whose trials the family or the trainer would refuse.

    1. Every declared value on its own: each fixed value, each choice, each range's
       low and high, each default, against the field's type and bounds.
    2. The baseline trial (the family's Config defaults projected into the space).
    3. Every probe value of each parameter, and every pair of probe values of two
       parameters, with the rest at the baseline and the parents set that make them
       active: that is where rules between fields (``moe_top_k <= moe_experts``) break.
    Rules between three or more fields are checked only where two of them vary.
    """
    from calotune.models.base import ConfigFieldError, check_field
    from calotune.models.registry import ParamError, check_param, config_fields, validate_params

    def check_value(key: str, name: str, value: Any) -> None:
        try:
            if name in TRAINER_PARAMS:
                check_field(TrainerConfig, name, value)
            else:
                check_param(family, name, value)
        except ConfigFieldError as exc:
            raise _fail(where, key, str(exc)) from None
        except ParamError as exc:
            raise _fail(where, key, exc.reason) from None

    for name, value in fixed.items():
        check_value(f"fixed.{name}", name, value)
    for p in params:
        declared = ([(f"choices[{i}]", c) for i, c in enumerate(p.choices)] if p.type == "categorical"
                    else [("low", p.low), ("high", p.high)])
        for label, value in [*declared, ("default", p.default)]:
            if value is not None:
                check_value(f"params.{p.name}.{label}", p.name, value)

    model_defaults = {n: f.default for n, f in config_fields(family).items()}
    by_name = {p.name: p for p in params}
    baseline_all = {p.name: p.project(p.default if p.default is not None else model_defaults.get(p.name))
                    for p in params}
    seen: set[tuple] = set()

    def refused(chosen: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
        """The trial point that ``chosen`` leads to, and the family's reason to refuse it."""
        point: dict[str, Any] = {}
        for p in params:
            if p.active(point):
                point[p.name] = chosen.get(p.name, baseline_all[p.name])
        if any(name not in point for name in chosen):
            return None  # these values never occur together in one trial
        signature = tuple((k, type(v).__name__, v) for k, v in point.items())
        if signature in seen:
            return None
        seen.add(signature)
        values = {**fixed, **point}
        try:
            validate_params(family, {k: v for k, v in values.items() if k not in TRAINER_PARAMS})
        except ParamError as exc:
            return point, exc.reason
        return None

    bad = refused({})
    if bad:
        raise _fail(where, "params", f"the baseline trial (the family's Config defaults projected "
                                     f"into the space: {bad[0]}{', fixed: ' if fixed else ''}"
                                     f"{fixed if fixed else ''}) is refused: {bad[1]}")
    probes = {p.name: _probes(p) for p in params}
    requirements = {p.name: _requirements(p, by_name) for p in params}
    sizes = [len(v) for v in probes.values()]
    work = sum(sizes) + (sum(sizes) ** 2 - sum(n * n for n in sizes)) // 2
    if work > MAX_DOMAIN_CHECKS:
        raise _fail(where, "params", f"declares too many values to check every pair of them "
                                     f"({work} configurations, at most {MAX_DOMAIN_CHECKS}); use "
                                     f"fewer choices or parameters")
    also = f" (with fixed {fixed})" if fixed else ""
    for p in params:  # one parameter at a time first: its message is the simplest
        for label, value in probes[p.name]:
            chosen = _merge(requirements[p.name], {p.name: value})
            bad = refused(chosen) if chosen is not None else None
            if bad:
                raise _fail(where, f"params.{p.name}",
                            f"a trial with {p.name}={_show(value)} ({label}) and the rest at the "
                            f"baseline{also} is refused: {bad[1]}")
    for i, p in enumerate(params):
        for q in params[i + 1:]:
            for label_p, vp in probes[p.name]:
                for label_q, vq in probes[q.name]:
                    chosen = _merge(requirements[p.name], requirements[q.name], {p.name: vp, q.name: vq})
                    bad = refused(chosen) if chosen is not None else None
                    if bad:
                        raise _fail(where, f"params.{p.name}, params.{q.name}",
                                    f"a trial with {p.name}={_show(vp)} ({label_p}) and "
                                    f"{q.name}={_show(vq)} ({label_q}){also} is refused: {bad[1]}")


def family_detectors(family: str) -> tuple[str, ...]:
    """The detector names (or name prefixes ending in ``-``) a family declares in DETECTORS."""
    from calotune.models.registry import get_family

    return tuple(getattr(get_family(family), "DETECTORS", ()))


def pairs_with(family: str, detector_name: str) -> bool:
    """Whether ``family`` can generate showers for ``detector_name``."""
    return any(detector_name == d or (d.endswith("-") and detector_name.startswith(d))
               for d in family_detectors(family))


def _check_pairing(where: str, family: str, detector_name: str) -> None:
    """A family builds models for the cell layouts it declares; any other pairing fails in
    every trial (or, worse, trains on a layout it silently misreads), so refuse it here."""
    if pairs_with(family, detector_name):
        return
    from calotune.detectors import detector_names
    from calotune.models.registry import family_names

    pairs = [f"{f}+{d}" for f in family_names() for d in detector_names() if pairs_with(f, d)]
    raise _fail(where, "detector", f"model family {family!r} does not generate showers for detector "
                                   f"{detector_name!r} (it declares {list(family_detectors(family))}); "
                                   f"pairs that exist: {', '.join(pairs)}")


def default_objective(detector: Any) -> tuple[str, str]:
    """The detector's own default objective (metric, mode): no detector's metric is the
    generic default. A detector may define ``default_objective()``; otherwise its first
    declared objective is used."""
    own = getattr(detector, "default_objective", None)
    if callable(own):
        metric, mode = own()
        return str(metric), str(mode)
    metric, mode = next(iter(detector.objectives().items()))
    return metric, mode


def _check_synthesis(where: str, detector: Any, options: dict[str, Any]) -> None:
    """``data.synthesis``: options of the detector's synthetic showers (ZDC: particle,
    mode), checked by asking the detector for two showers with them, so that the spec
    carries no detector's option names and refuses any the detector does not know."""
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool):
            raise _fail(where, f"data.synthesis.{_key(key)}", f"must be a number, string or boolean, "
                                                              f"but got {_show(value)}")
    if not options:
        return
    try:
        detector.synthesize(2, 0, **dict(options))
    except (UserError, ValueError, TypeError, KeyError) as exc:
        message = str(exc).split(": ", 1)[-1] if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise _fail(where, "data.synthesis", f"refused by detector {detector.name!r}: {message}") from None


def _geometry_keys(detector_name: str) -> list[str]:
    from calotune.detectors import get_detector

    return list(get_detector(detector_name).geometry_dict())


def _parse_objectives(where: str, raw: dict, allowed: dict[str, str],
                      default: tuple[str, str]) -> tuple[Objective, ...]:
    if "objective" in raw and "objectives" in raw:
        raise _fail(where, "objectives", "give either 'objective' or 'objectives', not both")
    fallback = {"metric": default[0], "mode": default[1]}
    items = raw.get("objectives") if "objectives" in raw else [raw.get("objective", fallback)]
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

    from calotune.cli import cli_main

    parser = argparse.ArgumentParser(prog="python -m calotune.spec", description=main.__doc__)
    parser.add_argument("spaces", nargs="+", help="names in search_spaces/ or YAML paths")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 2 when a space has warnings (dead conditionals, single "
                             "values, narrow log ranges, ignored parameters), e.g. in CI")

    def body(args: argparse.Namespace) -> int:
        from calotune.spec_lint import lint

        logger = logging.getLogger("calotune.spec")
        warned = 0
        for name in args.spaces:
            spec = load_spec(name)
            # Warnings never stop a space from loading: a wasteful space still runs. They
            # are printed before its "ok" line; --strict makes them fail the command.
            warnings = lint(spec)
            for warning in warnings:
                logger.warning("%s", warning)
            warned += len(warnings)
            logger.info(
                "%s: ok%s (%s on %s, %d parameters, objectives %s, %d trials x %d epochs)", spec.source,
                f" with {len(warnings)} warning(s)" if warnings else "",
                spec.family, spec.detector, len(spec.params), ", ".join(o.metric for o in spec.objectives),
                spec.trials, spec.max_epochs)
        if warned and args.strict:
            raise UserError(f"--strict: {warned} warning(s) above; fix the space(s) or drop --strict")
        return 0

    return cli_main(parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
