"""Hostile and subtly wrong search spaces: each is refused before Ray or MLflow start.

One section per failure class of the user report: values the family or trainer refuses,
resources, steps and `select`, duplicate keys, YAML bombs, unsafe names, too few events.
Every refusal is one UserError naming the file, the key, the rule and the value.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calotune.errors import UserError
from calotune.models.registry import ParamError, config_fields, make_config, validate_params
from calotune.spec import (
    MAX_SPACE_BYTES,
    MAX_YAML_DEPTH,
    MIN_SPLIT_EVENTS,
    SPACES_DIR,
    check_split_events,
    load_spec,
    min_split_events,
    parse_spec,
    split_sizes,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCE = "spaces/hostile.yaml"


def _valid() -> dict:
    return yaml.safe_load((SPACES_DIR / "zdc_swiglu.yaml").read_text())


def _refused(change: Callable[[dict], object], *needles: str) -> str:
    raw = _valid()
    change(raw)
    with pytest.raises(UserError) as info:
        parse_spec(raw, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _params(raw: dict) -> dict:
    return raw["params"]


# ---- 1. values the family or the trainer would refuse -------------------------------
FAMILY_CASES = {
    "float range for an int field": (
        lambda r: _params(r).update(low_rank={"type": "float", "low": 2, "high": 16}),
        "params.low_rank.low", "must be an integer", "2.0"),
    "fixed batch_size 0": (
        lambda r: (_params(r).pop("batch_size"), r.update(fixed={"batch_size": 0})),
        "fixed.batch_size", "batch_size > 0 must hold", "batch_size=0"),
    "batch_size range reaching 0": (
        lambda r: _params(r).update(batch_size={"type": "int", "low": 0, "high": 64, "step": 16}),
        "params.batch_size.low", "batch_size > 0 must hold"),
    "fixed dropout 1.5": (
        lambda r: r.update(fixed={"dropout": 1.5}), "fixed.dropout", "0 <= dropout < 1", "1.5"),
    "dropout range up to 1": (
        lambda r: _params(r).update(dropout={"type": "float", "low": 0.0, "high": 1.0}),
        "params.dropout.high", "0 <= dropout < 1", "dropout=1.0"),
    "string width choice": (
        lambda r: _params(r)["hidden_width"].update(choices=[64, "128"]),
        "params.hidden_width.choices[1]", "must be an integer", "'128'"),
    "bool for an int": (
        lambda r: r.update(fixed={"n_layers": True}), "fixed.n_layers", "must be an integer", "True"),
    "int choices for a bool field": (
        lambda r: (_params(r).pop("moe_experts"), _params(r).pop("moe_top_k"),
                   _params(r)["use_moe"].update(choices=[0, 1])),
        "params.use_moe.choices[0]", "must be true/false", "use_moe=0"),
    "string for a float": (
        lambda r: r.update(fixed={"moe_aux_weight": "1e-3"}), "fixed.moe_aux_weight", "must be a number"),
    "negative learning rate corner": (
        lambda r: _params(r)["lr_critic"].update(low=-1e-3, log=False),
        "params.lr_critic.low", "lr_critic > 0"),
    "zero width default": (
        lambda r: _params(r).update(critic_width={"type": "int", "low": 0, "high": 8, "default": 4}),
        "params.critic_width.low", "critic_width > 0"),
    "top_k above experts at a corner": (
        lambda r: _params(r)["moe_top_k"].update(high=4),
        "params.moe_experts, params.moe_top_k", "moe_top_k <= moe_experts", "moe_top_k=3"),
    "fixed top_k above the experts range": (
        lambda r: (_params(r).pop("moe_top_k"), r.update(fixed={"moe_top_k": 3})),
        "params.moe_experts", "moe_top_k <= moe_experts", "moe_experts=2"),
    "baseline breaks a rule between fields": (
        lambda r: (_params(r).clear(), _params(r).update(moe_experts={"type": "int", "low": 1, "high": 1})),
        "params", "baseline", "moe_top_k <= moe_experts"),
    "straight-through above 1": (
        lambda r: _params(r).update(mask_straight_through={"type": "float", "low": 0.0, "high": 2.0}),
        "params.mask_straight_through.high", "mask_straight_through <= 1"),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_values_the_family_or_trainer_refuses(case: str) -> None:
    change, *needles = FAMILY_CASES[case]
    _refused(change, *needles)


_BOUNDED = sorted(
    (name, f.metadata) for name, f in config_fields("zdc_swiglu").items() if f.metadata
)


@FAST
@given(field=st.sampled_from(_BOUNDED), excess=st.floats(1e-6, 1e6), where=st.sampled_from(["fixed", "high"]))
def test_any_value_beyond_a_declared_bound_is_refused(field: tuple, excess: float, where: str) -> None:
    """Generic: every bounded Config field, every way past its bound, fixed or as a range end."""
    name, meta = field
    if "le" in meta or "lt" in meta:
        bad = meta.get("le", meta.get("lt")) + excess
    else:
        bad = meta.get("ge", meta.get("gt")) - excess
    is_int = isinstance(config_fields("zdc_swiglu")[name].default, int)
    bad = (math.floor(bad) if "ge" in meta or "gt" in meta else math.ceil(bad)) if is_int else bad

    def change(raw: dict) -> None:
        for other in (name, "moe_experts", "moe_top_k", "use_moe"):  # no `when` left dangling
            raw["params"].pop(other, None)
        if where == "fixed":
            raw["fixed"] = {name: bad}
        else:
            good = config_fields("zdc_swiglu")[name].default
            lo, hi = sorted((good, bad))
            raw["params"][name] = {"type": "int" if is_int else "float", "low": lo, "high": hi}

    _refused(change, name, "must hold")


def test_registry_names_the_refused_parameter() -> None:
    with pytest.raises(ParamError) as info:
        validate_params("zdc_swiglu", {"hidden_width": "64"})
    assert info.value.param == "hidden_width" and "'64'" in str(info.value)
    with pytest.raises(ParamError) as info:
        validate_params("zdc_swiglu", {"moe_top_k": 5})
    assert info.value.param is None and "moe_top_k <= moe_experts" in str(info.value)
    with pytest.raises(UserError, match="dropout"):
        make_config("zdc_swiglu", {"dropout": 1.5})
    validate_params("zdc_swiglu", {"hidden_width": np.int64(64), "lr_critic": np.float32(1e-3)})


# ---- 2. resources ---------------------------------------------------------------------
RESOURCE_CASES = [
    ("cpus_per_trial", 0, "must be positive (> 0)"),
    ("cpus_per_trial", -1, "must be positive (> 0)"),
    ("cpus_per_trial", 0.0, "must be positive (> 0)"),
    ("cpus_per_trial", float("nan"), "finite"),
    ("cpus_per_trial", 1e-6, "0.0001"),
    ("gpus_per_trial", -0.5, ">= 0"),
    ("gpus_per_trial", 1.5, "whole number"),
    ("gpus_per_trial", float("inf"), "finite"),
    ("workers_per_trial", 0, "positive integer"),
    ("workers_per_trial", 1.5, "an integer"),
    ("max_concurrent_trials", 0, "positive integer"),
    ("max_concurrent_trials", -3, "positive integer"),
]


@pytest.mark.parametrize(("key", "value", "rule"), RESOURCE_CASES, ids=[f"{k}={v}" for k, v, _ in RESOURCE_CASES])
def test_bad_resources(key: str, value: float, rule: str) -> None:
    _refused(lambda r: r["resources"].update({key: value}), f"resources.{key}", rule)


@pytest.mark.parametrize("resources", [{"gpus_per_trial": 0.25}, {"gpus_per_trial": 2.0},
                                       {"cpus_per_trial": 0.5, "max_concurrent_trials": 3}])
def test_good_resources_load(resources: dict) -> None:
    raw = _valid()
    raw["resources"].update(resources)
    loaded = parse_spec(raw, source=SOURCE).resources
    for key, value in raw["resources"].items():
        assert getattr(loaded, key) == value


# ---- 3. steps and select --------------------------------------------------------------
@FAST
@given(low=st.integers(1, 100), step=st.integers(2, 9), n=st.integers(0, 10), data=st.data())
def test_int_step_that_does_not_divide_is_refused(low: int, step: int, n: int, data: st.DataObject) -> None:
    rest = data.draw(st.integers(1, step - 1))
    high = low + n * step + rest
    nearest = low + n * step if rest <= step - rest else low + (n + 1) * step
    _refused(lambda r: _params(r).update(batch_size={"type": "int", "low": low, "high": high, "step": step}),
             "params.batch_size", "`step` must divide `high - low`", f"nearest valid high is {nearest}",
             f"high={high}")


@pytest.mark.parametrize(("low", "high", "step", "nearest"), [
    (0.1, 1.0, 0.25, "1.1"), (0.0, 1.0, 0.3, "0.9"), (0.5, 1.0, 0.2, "0.9"), (0.0, 0.07, 0.1, "0.1"),
])
def test_float_step_that_does_not_divide_is_refused(low: float, high: float, step: float, nearest: str) -> None:
    _refused(lambda r: _params(r)["mask_loss_weight"].update(low=low, high=high, step=step),
             "params.mask_loss_weight", "`step` must divide", f"nearest valid high is {nearest}")


@pytest.mark.parametrize(("low", "high", "step"), [(0.1, 1.1, 0.25), (0.0, 1.0, 0.1), (0.5, 0.5, 0.2)])
def test_float_step_that_divides_loads(low: float, high: float, step: float) -> None:
    raw = _valid()
    raw["params"]["mask_loss_weight"].update(low=low, high=high, step=step)
    parse_spec(raw, source=SOURCE)


@pytest.mark.parametrize("select", ["first", "knee", "mean_separation", "whatever"])
def test_select_with_one_objective_is_refused(select: str) -> None:
    _refused(lambda r: r.update(select=select), "select", "one", select)


# ---- 4. duplicate keys ----------------------------------------------------------------
VALID_TEXT = (SPACES_DIR / "zdc_swiglu_tiny.yaml").read_text()


def _load_text(tmp_path: Path, text: str | bytes, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as info:
        load_spec(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(("edit", "key", "first"), [
    (lambda t: t + "name: other\n", "name", "name: zdc_swiglu_tiny"),
    (lambda t: t.replace("params:\n", "params:\n  mask_loss_weight: {type: float, low: 0, high: 1}\n"),
     "params.mask_loss_weight", "mask_loss_weight: {type: float, low: 0, high: 1}"),
    (lambda t: t.replace("{events: 400, seed: 1}", "{events: 400, seed: 1, seed: 2}"), "data.seed", "seed: 2"),
    (lambda t: t.replace("log: true}", "log: true, log: false}"), "params.lr_generator.log", "log: false"),
    (lambda t: t + "fixed: {hidden_width: 64}\n", "fixed", "fixed: {hidden_width: 32"),
])
def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path, edit: Callable, key: str, first: str) -> None:
    text = edit(VALID_TEXT)
    message = _load_text(tmp_path, text)
    lines = [i for i, line in enumerate(text.splitlines(), 1) if key.rsplit(".", 1)[-1] + ":" in line]
    assert f"{key}: duplicate key at line {max(lines)} (first at line {min(lines)})" in message \
        or f"{key}: duplicate key at line {lines[0]} (first at line {lines[0]})" in message, message
    assert _line(text, first) in (min(lines), max(lines))


# ---- 5. YAML bombs and unreadable files -----------------------------------------------
LAUGHS = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for c, p in zip("abcdefghi", [None, *"abcdefgh"], strict=True)
) + "family: zdc_swiglu\n"

HOSTILE = {
    "billion laughs": (LAUGHS, "anchor &a is not allowed"),
    "alias without anchor use": (VALID_TEXT.replace("seed: 1}", "seed: 1, s: *x}"), "not allowed"),
    "one anchor": (VALID_TEXT.replace("data: {", "data: &d {"), "anchor &d is not allowed"),
    "merge key": (VALID_TEXT + "fixed2: {<<: {a: 1}}\n", "merge key << at line"),
    "deep flow nesting": ("a: " + "[" * 20000 + "]" * 20000 + "\n", f"deeper than {MAX_YAML_DEPTH}"),
    "deep block nesting": ("".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
                           f"deeper than {MAX_YAML_DEPTH}"),
    "enormous integer": (VALID_TEXT.replace("events: 400", "events: " + "9" * 20000), "characters is longer"),
    "large integer": (VALID_TEXT.replace("events: 400", "events: " + "9" * 300), "2**53"),
    "enormous string": (VALID_TEXT + "description: " + "x" * 30000 + "\n", "characters is longer"),
    "file too large": (VALID_TEXT + "#" * (MAX_SPACE_BYTES + 1), f"at most {MAX_SPACE_BYTES} bytes"),
    "impossible date": (VALID_TEXT + "description: 2024-13-45\n", "malformed YAML"),
    "null byte": (VALID_TEXT + "\x00", "malformed YAML"),
    "python tag": (VALID_TEXT + "description: !!python/object/apply:os.system ['true']\n", "malformed YAML"),
    "binary description": (VALID_TEXT + "description: !!binary aGk=\n", "description: must be a string"),
    "two documents": (VALID_TEXT + "---\nfamily: x\n", "malformed YAML"),
    "empty file": ("", "must hold a mapping"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_yaml_is_refused_cleanly(tmp_path: Path, case: str) -> None:
    """Timing-independent: the refusal and its message, not how long it took."""
    text, needle = HOSTILE[case]
    assert needle in _load_text(tmp_path, text)


def test_not_utf8_and_unreadable(tmp_path: Path) -> None:
    assert "not UTF-8" in _load_text(tmp_path, VALID_TEXT.replace("smoke", "sm\xf6ke").encode("latin-1"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        load_spec(str(tmp_path / "dir.yaml"))


@FAST
@given(depth=st.integers(MAX_YAML_DEPTH + 1, 3000), flow=st.booleans())
def test_any_depth_beyond_the_bound_is_refused(tmp_path_factory: pytest.TempPathFactory, depth: int,
                                               flow: bool) -> None:
    tmp = tmp_path_factory.mktemp("deep")
    text = "a: " + ("[" * depth + "]" * depth if flow else "{b: " * depth + "1" + "}" * depth)
    path = tmp / "deep.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError, match="deeper than"):
        load_spec(str(path))


# ---- 6. names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc/passwd", ".hidden", "a/b", "a b", "", "x" * 65, "é", "a\nb",
                                  "..", "name;rm", 42, None, ["a"]])
def test_unsafe_names_are_refused(name: object) -> None:
    _refused(lambda r: r.update(name=name), "name: must")


@FAST
@given(name=st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", fullmatch=True))
def test_safe_names_are_kept(name: str) -> None:
    raw = _valid()
    raw["name"] = name
    assert parse_spec(raw, source=SOURCE).name == name


@pytest.mark.parametrize("stem", [".hidden", "my space", "a;b", "x" * 70])
def test_default_name_from_an_unsafe_file_name_is_refused(tmp_path: Path, stem: str) -> None:
    raw = _valid()
    del raw["name"]
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "taken from the file name" in _load_text(tmp_path, path.read_text(), path.name)


# ---- 7. too few events ----------------------------------------------------------------
@pytest.mark.parametrize(("events", "fractions"), [(10, {}), (100, {}), (247, {}),
                                                   (1000, {"validation_fraction": 0.01})])
def test_too_few_events_for_the_splits_are_refused(events: int, fractions: dict) -> None:
    _refused(lambda r: r["data"].update(events=events, **fractions), "data.events", str(MIN_SPLIT_EVENTS),
             f"{events} events")


@FAST
@given(vf=st.floats(0.005, 0.49), tf=st.floats(0.005, 0.49))
def test_min_split_events_is_enough_and_matches_the_splitter(vf: float, tf: float) -> None:
    from calotune.data.splits import split

    n = min_split_events(vf, tf)
    assert min(split_sizes(n, vf, tf)) >= MIN_SPLIT_EVENTS
    check_split_events(n, vf, tf, where=SOURCE)

    class Fake:  # just enough of a ShowerSet for split()
        def __len__(self) -> int:
            return n

        def subset(self, idx: np.ndarray) -> int:
            return len(idx)

    cut = split(Fake(), vf, tf)  # type: ignore[arg-type]
    assert (cut.train, cut.validation, cut.test) == split_sizes(n, vf, tf)


def test_cli_says_ok_only_for_runnable_spaces(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from calotune.spec import main

    bad = _valid()
    bad["fixed"] = {"dropout": 1.5}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fixed.dropout" in err[0] and "ok" not in err[0].split(":")[-1]
    assert ": ok (" not in caplog.text
    with caplog.at_level(logging.INFO, logger="calotune.spec"):
        assert main(["zdc_swiglu_tiny"]) == 0
    assert ": ok (" in caplog.text


def test_shipped_spaces_are_untouched_by_the_checks() -> None:
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        spec = load_spec(str(path))
        assert spec == parse_spec(copy.deepcopy(yaml.safe_load(path.read_text())), source=str(path),
                                  default_name=path.stem)
