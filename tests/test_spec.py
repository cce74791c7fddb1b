"""Search-space loading: every shipped file loads; every broken rule gives a clean message."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calotune.errors import UserError
from calotune.spec import SPACES_DIR, load_spec, parse_spec

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def _valid() -> dict:
    return yaml.safe_load((SPACES_DIR / "zdc_swiglu.yaml").read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_space_loads_and_samples(path: Path) -> None:
    spec = load_spec(str(path))
    assert spec.params, "a search space must declare parameters"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = spec.suggest(study.ask())
        for p in spec.params:
            if p.active(values):
                assert p.name in values
            else:
                assert p.name not in values


def test_load_by_name_matches_path() -> None:
    assert load_spec("zdc_swiglu") == load_spec(str(SPACES_DIR / "zdc_swiglu.yaml"))


def test_types_are_declared_not_inferred() -> None:
    spec = load_spec("zdc_swiglu")
    params = {p.name: p for p in spec.params}
    assert params["lr_generator"].type == "float" and params["lr_generator"].log
    assert params["low_rank"].type == "int" and params["low_rank"].step == 2
    assert params["use_moe"].type == "categorical"
    assert params["moe_experts"].when == {"use_moe": True}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {spec.suggest(study.ask())["low_rank"] for _ in range(40)}
    assert seen <= set(range(2, 17, 2)) and len(seen) > 2


def test_defaults_point_respects_conditions() -> None:
    spec = load_spec("zdc_swiglu")
    point = spec.defaults({"use_moe": False, "lr_generator": 1e-3})
    assert point["use_moe"] is False
    assert "moe_experts" not in point
    assert point["lr_generator"] == 1e-3


def test_defaults_outside_the_space_are_projected_into_it() -> None:
    spec = load_spec("zdc_swiglu")
    point = spec.defaults({"hidden_width": 100, "low_rank": 7, "lr_generator": 1.0, "use_moe": "maybe"})
    assert point["hidden_width"] == 128  # nearest declared choice
    assert point["low_rank"] in (6, 8)  # on the step grid
    assert point["lr_generator"] == 5.0e-3  # clipped to high
    assert point["use_moe"] is False  # first choice


def _mutated(change) -> dict:
    raw = _valid()
    change(raw)
    return raw


CASES = {
    "unknown top-level key": (lambda r: r.update(epochs=3), "epochs", "unknown key"),
    "unknown param key": (lambda r: r["params"]["lr_critic"].update(scale=2), "params.lr_critic", "unknown key"),
    "wrong type": (lambda r: r["params"]["lr_critic"].update(low="small"), "params.lr_critic.low", "number"),
    "low > high": (lambda r: r["params"]["lr_critic"].update(low=1e-2, high=1e-4), "params.lr_critic",
                   "`low <= high` must hold, but got (low=0.01, high=0.0001)"),
    "log with low <= 0": (lambda r: r["params"]["lr_critic"].update(low=0.0), "params.lr_critic", "low > 0"),
    "unknown parent": (lambda r: r["params"]["moe_experts"].update(when={"use_experts": True}),
                       "params.moe_experts.when", "unknown parent parameter 'use_experts'"),
    "unknown family": (lambda r: r.update(family="zdc_transformer"), "family", "unknown model family"),
    "unknown detector": (lambda r: r.update(detector="atlas"), "detector", "unknown detector"),
    "unknown objective": (lambda r: r.update(objective={"metric": "fid"}), "objective", "unknown objective"),
    "param not in model": (lambda r: r["params"].update(warp={"type": "float", "low": 0, "high": 1}),
                           "params.warp", "not a parameter"),
    "int with float bounds": (lambda r: r["params"]["low_rank"].update(low=2.5), "params.low_rank.low", "integer"),
    "empty choices": (lambda r: r["params"]["hidden_width"].update(choices=[]), "params.hidden_width.choices",
                      "non-empty"),
    "bad resources": (lambda r: r["resources"].update(workers_per_trial=0), "resources.workers_per_trial",
                      "positive"),
    "zero cpus": (lambda r: r["resources"].update(cpus_per_trial=0), "resources.cpus_per_trial", "positive"),
    "value the family refuses": (lambda r: r.update(fixed={"dropout": 1.5}), "fixed.dropout",
                                 "0 <= dropout < 1 must hold, but got dropout=1.5"),
    "step that does not divide": (lambda r: r["params"]["low_rank"].update(high=15), "params.low_rank",
                                  "`step` must divide `high - low`"),
    "select with one objective": (lambda r: r.update(select="knee"), "select", "one"),
    "unsafe name": (lambda r: r.update(name="../../x"), "name", "letters, digits"),
    "too few events": (lambda r: r["data"].update(events=60), "data.events", "at least 50 events"),
    "bool for int": (lambda r: r["budget"].update(trials=True), "budget.trials", "integer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_rule_names_file_key_and_rule(case: str) -> None:
    change, key, rule = CASES[case]
    with pytest.raises(UserError) as info:
        parse_spec(_mutated(change), source="spaces/broken.yaml")
    message = str(info.value)
    assert message.startswith("spaces/broken.yaml: "), message
    assert key in message, message
    assert rule in message, message
    assert "\n" not in message


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: zdc_swiglu\nparams:\n  lr: {type: float, low: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_spec(str(bad))


def test_unknown_space_name_lists_known() -> None:
    with pytest.raises(UserError, match=r"unknown search space 'zdc_swiglo'.*zdc_swiglu"):
        load_spec("zdc_swiglo")


_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3),
                    st.integers(), st.sampled_from([0, 1, 2, 0.0, 0.5, 1.0, 1.5, 2**53 + 1, 10**400, -1e-9]),
                    st.sampled_from(["../x", ".x", "64", "true", "", "a" * 100, "knee", "first"]),
                    st.dictionaries(st.sampled_from(["type", "low", "high", "step", "choices", "when",
                                                     "default", "log"]),
                                    st.one_of(st.integers(-3, 300), st.floats(-1, 2), st.booleans(),
                                              st.sampled_from(["int", "float", "categorical"]),
                                              st.lists(st.integers(-1, 9), max_size=3)), max_size=5))


def _assert_runnable(spec, study) -> None:
    """What 'ok' promises: every point the sampler can hand out builds a Config."""
    from calotune.models.registry import config_fields, validate_params
    from calotune.spec import TRAINER_PARAMS, TrainerConfig

    defaults = {n: f.default for n, f in config_fields(spec.family).items()}
    points = [spec.defaults(defaults)] + [spec.suggest(study.ask()) for _ in range(4)]
    for point in points:
        values = {**spec.fixed, **point}
        validate_params(spec.family, {k: v for k, v in values.items() if k not in TRAINER_PARAMS})
        TrainerConfig(**{k: v for k, v in values.items() if k in TRAINER_PARAMS})
        assert all(values.get(k, 1) >= 1 for k in TRAINER_PARAMS)


# SPEC_FUZZ_EXAMPLES=3000 for a deeper run (a few minutes); CI keeps the default.
@settings(max_examples=int(os.environ.get("SPEC_FUZZ_EXAMPLES", "120")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_give_clean_errors_or_success(data: st.DataObject) -> None:
    """Any mutation of a valid spec is either refused with a UserError (and nothing else) or
    accepted, and then every trial it can produce is one the family and trainer accept."""
    raw = copy.deepcopy(_valid())
    for _ in range(data.draw(st.integers(1, 3))):
        node = raw
        path = []
        while isinstance(node, dict) and node and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], dict):
                break
            path.append(key)
            node = node[key]
        if not isinstance(node, dict) or not node:
            continue
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            node[key] = data.draw(_LEAVES)
        elif action == "delete":
            del node[key]
        else:
            node[data.draw(st.text(min_size=1, max_size=6))] = data.draw(_LEAVES)
    try:
        spec = parse_spec(raw, source="mutated.yaml")
    except UserError as exc:
        assert str(exc).startswith("mutated.yaml")
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    spec.suggest(study.ask())  # an accepted spec must be usable by Optuna
    study.enqueue_trial(spec.defaults({}))  # and its baseline must be a point of the space
    spec.suggest(study.ask())
    _assert_runnable(spec, study)


_YAML_BITS = st.sampled_from(["&a ", "*a", "<<: ", "{", "}", "[", "]", ": ", "- ", "\n", "\n  ",
                              "name: x\n", "seed: 2\n", "!!binary ", "!!set ", "~", "'", '"', "#",
                              "9" * 30, "\t", ".inf", "0x10", "2024-13-45", "---\n"])


@settings(max_examples=int(os.environ.get("SPEC_FUZZ_EXAMPLES", "120")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_yaml_text_edits_give_clean_errors_or_success(tmp_path: Path, data: st.DataObject) -> None:
    """Edits of the file's text (anchors, duplicate keys, broken syntax): UserError or ok."""
    text = (SPACES_DIR / "zdc_swiglu_tiny.yaml").read_text()
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(_YAML_BITS) + text[at:]
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    try:
        spec = load_spec(str(path))
    except UserError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    _assert_runnable(spec, optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)))


# --- which family fits which detector, and what the detector decides ---------------------
def _tiny_raw() -> dict:
    return yaml.safe_load((SPACES_DIR / "zdc_swiglu_tiny.yaml").read_text())


@pytest.mark.parametrize("detector", ["calochallenge-3", "calochallenge-1-photons", "calochallenge-2"])
def test_family_refuses_a_detector_it_does_not_declare(detector: str) -> None:
    raw = _tiny_raw()
    raw["detector"] = detector
    raw.pop("geometry")
    with pytest.raises(UserError) as err:
        parse_spec(raw, "space.yaml")
    message = str(err.value)
    assert f"does not generate showers for detector {detector!r}" in message
    assert "pairs that exist: " in message and "zdc_swiglu+zdc" in message.split("pairs that exist: ")[1]


def test_objective_defaults_to_the_detectors_own() -> None:
    from calotune.detectors import get_detector
    from calotune.spec import default_objective

    raw = _tiny_raw()
    raw.pop("objective")
    spec = parse_spec(raw, "space.yaml")
    assert (spec.objective.metric, spec.objective.mode) == default_objective(get_detector("zdc"))


@pytest.mark.parametrize(("data", "needle"), [
    ({"synthesis": {"particle": "muon"}}, "data.synthesis: refused by detector 'zdc'"),
    ({"synthesis": {"colour": "red"}}, "data.synthesis: refused by detector 'zdc'"),
    ({"synthesis": {"particle": [1]}}, "data.synthesis.particle"),
    ({"particle": "neutron"}, "data.particle: unknown key"),  # detector options live in data.synthesis
])
def test_data_synthesis_options_belong_to_the_detector(data: dict, needle: str) -> None:
    raw = _tiny_raw()
    raw["data"] = {**raw["data"], **data}
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_spec(raw, "space.yaml")


def test_valid_synthesis_options_are_kept() -> None:
    raw = _tiny_raw()
    raw["data"]["synthesis"] = {"particle": "photon", "mode": "pencil"}
    assert parse_spec(raw, "space.yaml").data.synthesis == {"particle": "photon", "mode": "pencil"}
