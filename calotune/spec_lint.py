"""Warnings about a valid search space that wastes its budget, before any compute.

:func:`calotune.spec.load_spec` refuses a space that cannot run (bad bounds, unknown
parameters, a ``when`` naming a value its parent cannot take, a corner the family's
Config refuses). A space that loads can still spend trials on nothing; these rules say
where, without refusing it (``python -m calotune.spec SPACE`` prints them; ``--strict``
turns them into exit status 2, for CI):

- ``dead-conditional``: a parameter whose ``when`` conditions, followed up through its
  parents, contradict each other (it needs ``a=x`` itself and ``a=y`` through a parent),
  so no trial ever samples it;
- ``single-value``: a range with ``low == high`` or a categorical with one choice: a
  constant that belongs under ``fixed`` (Optuna still models it; TPE spends nothing on
  it, but the space says "searched" for a value that never changes). Not reported for a
  one-trial space (``budget.trials: 1``): that runs one configuration by design, and the
  loader wants at least one parameter (``hgcal_score_thesis`` is one);
- ``narrow-log-range``: ``log: true`` over less than a factor 2 (``high / low < 2``):
  log sampling exists for ranges spanning orders of magnitude; below a factor 2 it is
  indistinguishable from linear sampling, so the range is probably mistyped (1e-3 to
  2e-3 for 1e-4 to 2e-3);
- ``ignored-parameter``: a searched parameter the family's Config ignores under the
  space's settings. A family declares which of its fields act only under another
  field's value in ``IGNORED_UNLESS`` (field -> {gate field: value}, e.g. ZDC SwiGLU's
  ``moe_experts`` needs ``use_moe: true``); a parameter whose gate is fixed (or left at
  its default) to another value is never used, and one whose gate is searched without a
  matching ``when`` is varied in trials that ignore it. Names that are no field of the
  Config at all are already refused by the loader, an error rather than a warning.

Each warning names the file, the parameter, the rule and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Rule names, in the order they are checked.
RULES = ("dead-conditional", "single-value", "narrow-log-range", "ignored-parameter")
#: ``high / low`` below which a log range is reported.
MIN_LOG_RATIO = 2.0


@dataclass(frozen=True)
class LintWarning:
    """One finding: where (file, key), which rule, and the value that triggered it."""

    source: str
    key: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.rule}: {self.message}"


def _requirements(p: Any, by_name: dict[str, Any]) -> dict[str, Any] | None:
    """Parent values that make ``p`` active, followed through its parents; None if the
    conditions contradict each other (then no assignment activates ``p``)."""
    required: dict[str, Any] = {}
    stack = [p]
    while stack:
        for parent, want in stack.pop().when.items():
            if parent in required and (type(required[parent]) is not type(want) or required[parent] != want):
                return None
            required[parent] = want
            if parent in by_name:
                stack.append(by_name[parent])
    return required


def _dead(spec: Any) -> list[LintWarning]:
    by_name = {p.name: p for p in spec.params}
    out = []
    for p in spec.params:
        if p.when and _requirements(p, by_name) is None:
            chain = ", ".join(f"{k}={v!r}" for k, v in p.when.items())
            out.append(LintWarning(spec.source, f"params.{p.name}.when", "dead-conditional",
                                   f"{{{chain}}} can never hold together with the conditions of its parents "
                                   f"({_parents(p, by_name)}), so no trial samples {p.name}; fix the "
                                   f"when or remove the parameter"))
    return out


def _parents(p: Any, by_name: dict[str, Any]) -> str:
    parts = []
    for parent in p.when:
        q = by_name.get(parent)
        if q is not None and q.when:
            parts.append(f"{parent} needs " + ", ".join(f"{k}={v!r}" for k, v in q.when.items()))
    return "; ".join(parts) or "none"


def _single(spec: Any) -> list[LintWarning]:
    out: list[LintWarning] = []
    if spec.trials == 1:  # one configuration by design, not a search (see the module docstring)
        return out
    for p in spec.params:
        if p.type == "categorical" and len(p.choices) == 1:
            out.append(LintWarning(spec.source, f"params.{p.name}.choices", "single-value",
                                   f"one choice {list(p.choices)}: nothing to search; move it to "
                                   f"fixed: {{{p.name}: {p.choices[0]!r}}}"))
        elif p.type != "categorical" and p.low == p.high:
            out.append(LintWarning(spec.source, f"params.{p.name}", "single-value",
                                   f"low == high == {p.low!r}: nothing to search; move it to "
                                   f"fixed: {{{p.name}: {p.low!r}}}"))
    return out


def _narrow_log(spec: Any) -> list[LintWarning]:
    out = []
    for p in spec.params:
        if p.type != "categorical" and p.log and p.low < p.high and p.high / p.low < MIN_LOG_RATIO:
            out.append(LintWarning(spec.source, f"params.{p.name}", "narrow-log-range",
                                   f"log range [{p.low!r}, {p.high!r}] spans a factor {p.high / p.low:.3g} "
                                   f"(< {MIN_LOG_RATIO:g}): log sampling is for ranges over orders of "
                                   f"magnitude; check the bounds or drop log: true"))
    return out


def _ignored(spec: Any) -> list[LintWarning]:
    from calotune.models.registry import config_fields, get_family

    rules: dict[str, dict[str, Any]] = dict(getattr(get_family(spec.family), "IGNORED_UNLESS", {}))
    if not rules:
        return []
    defaults = {n: f.default for n, f in config_fields(spec.family).items()}
    by_name = {p.name: p for p in spec.params}
    out = []
    for p in spec.params:
        for gate, want in rules.get(p.name, {}).items():
            needs = f"{spec.family!r} uses {p.name} only when {gate}={want!r}"
            if gate in by_name:
                gate_param = by_name[gate]
                required = _requirements(p, by_name)
                if required is None:  # dead: reported as dead-conditional
                    continue
                choices = list(gate_param.choices) if gate_param.type == "categorical" else None
                if gate in required or choices == [want]:
                    continue
                out.append(LintWarning(spec.source, f"params.{p.name}", "ignored-parameter",
                                       f"{needs}, but it is searched also where {gate} takes its other "
                                       f"values, where it changes nothing; add when: {{{gate}: {want!r}}}"))
                continue
            value = spec.fixed.get(gate, defaults.get(gate))
            if type(value) is not type(want) or value != want:
                where = "fixed to" if gate in spec.fixed else "left at its default"
                out.append(LintWarning(spec.source, f"params.{p.name}", "ignored-parameter",
                                       f"{needs}, but {gate} is {where} {value!r}, so no trial uses it; "
                                       f"search {gate} (with when: {{{gate}: {want!r}}} here) or remove "
                                       f"{p.name}"))
    return out


def lint(spec: Any) -> list[LintWarning]:
    """Every warning for a loaded :class:`calotune.spec.SearchSpec`, rule by rule."""
    return [*_dead(spec), *_single(spec), *_narrow_log(spec), *_ignored(spec)]
