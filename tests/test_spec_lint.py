"""Search-space warnings (calotune.spec_lint): one test per rule, the shipped spaces, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from calotune.spec import SPACES_DIR, load_spec, parse_spec
from calotune.spec_lint import RULES, lint

_TINY = {"family": "zdc_swiglu", "detector": "zdc",
         "geometry": {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6},
         "data": {"events": 400}, "budget": {"trials": 4, "max_epochs": 2}}


def _warnings(params: dict[str, Any], **extra: Any) -> list:
    return lint(parse_spec({**_TINY, "params": params, **extra}, "space.yaml"))


def test_a_conditional_that_contradicts_its_parents_is_dead() -> None:
    params = {"use_moe": {"type": "categorical", "choices": [False, True]},
              "critic_steps": {"type": "categorical", "choices": [1, 2], "when": {"use_moe": True}},
              # needs use_moe=False itself, and use_moe=True through critic_steps' condition
              "moe_experts": {"type": "int", "low": 2, "high": 4, "when": {"use_moe": False, "critic_steps": 2}}}
    found = _warnings(params)
    assert [(w.key, w.rule) for w in found] == [("params.moe_experts.when", "dead-conditional")]
    assert "space.yaml: params.moe_experts.when: dead-conditional: {use_moe=False, critic_steps=2}" in str(found[0])
    assert "critic_steps needs use_moe=True" in str(found[0])


def test_single_value_ranges_and_choices() -> None:
    found = _warnings({"lr_generator": {"type": "float", "low": 1e-3, "high": 1e-3},
                       "hidden_width": {"type": "categorical", "choices": [64]},
                       "mask_loss_weight": {"type": "float", "low": 0.0, "high": 2.0}})
    assert [(w.key, w.rule) for w in found] == [("params.lr_generator", "single-value"),
                                                 ("params.hidden_width.choices", "single-value")]
    assert "low == high == 0.001" in str(found[0]) and "fixed: {hidden_width: 64}" in str(found[1])
    # a one-trial space runs one configuration by design: not reported
    assert _warnings({"hidden_width": {"type": "categorical", "choices": [64]}}, budget={"trials": 1}) == []


def test_a_log_range_under_a_factor_two_is_reported() -> None:
    found = _warnings({"lr_generator": {"type": "float", "low": 1e-3, "high": 1.5e-3, "log": True},
                       "lr_critic": {"type": "float", "low": 1e-3, "high": 2e-3, "log": True}})
    assert [(w.key, w.rule) for w in found] == [("params.lr_generator", "narrow-log-range")]
    assert "[0.001, 0.0015] spans a factor 1.5" in str(found[0])


def test_parameters_the_config_ignores_under_the_spaces_settings() -> None:
    experts = {"type": "int", "low": 2, "high": 8}
    # use_moe left at its default (False): moe_experts is never used
    off = _warnings({"moe_experts": experts, "lr_generator": {"type": "float", "low": 1e-4, "high": 1e-2}})
    assert [(w.key, w.rule) for w in off] == [("params.moe_experts", "ignored-parameter")]
    assert "use_moe is left at its default False" in str(off[0])
    fixed_off = _warnings({"moe_experts": experts}, fixed={"use_moe": False})
    assert "use_moe is fixed to False" in str(fixed_off[0])
    # searched gate without a when: varied in trials that ignore it
    unguarded = _warnings({"use_moe": {"type": "categorical", "choices": [False, True]}, "moe_experts": experts})
    assert [w.rule for w in unguarded] == ["ignored-parameter"] and "add when: {use_moe: True}" in str(unguarded[0])
    # the right ways: conditional on the gate, or the gate fixed on
    assert _warnings({"use_moe": {"type": "categorical", "choices": [False, True]},
                      "moe_experts": {**experts, "when": {"use_moe": True}}}) == []
    assert _warnings({"moe_experts": experts}, fixed={"use_moe": True}) == []


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_lint_clean(path: Path) -> None:
    assert lint(load_spec(str(path))) == []


def test_cli_prints_warnings_exits_0_and_2_with_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from calotune.spec import main

    space = tmp_path / "narrow.yaml"
    space.write_text(yaml.safe_dump({**_TINY, "params": {
        "lr_generator": {"type": "float", "low": 1e-3, "high": 1.2e-3, "log": True}}}))
    with caplog.at_level("INFO", logger="calotune.spec"):
        assert main([str(space)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "calotune.spec"]
    assert lines[0] == (f"{space}: params.lr_generator: narrow-log-range: log range [0.001, 0.0012] spans a "
                        f"factor 1.2 (< 2): log sampling is for ranges over orders of magnitude; check the "
                        f"bounds or drop log: true")
    assert "ok with 1 warning(s)" in lines[1]
    assert main([str(space), "--strict"]) == 2
    assert main(["zdc_swiglu_tiny", "--strict"]) == 0
    assert set(RULES) == {"dead-conditional", "single-value", "narrow-log-range", "ignored-parameter"}
