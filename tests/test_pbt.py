"""Population-based training (arXiv 1711.09846): the settings' rules, explore, the first
population, the optimiser settings after an exploit, and one real tiny PBT search."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.spec import Param, load_spec, parse_spec
from calotune.tuning import pbt
from calotune.tuning.worker import TRAIN_STATE, TrialContext, train

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "p", "family": "zdc_swiglu", "detector": "zdc", "budget": {"trials": 4, "max_epochs": 4},
        "params": {"lr_generator": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "use_moe": {"type": "categorical", "choices": [False, True]},
                   "moe_experts": {"type": "int", "low": 2, "high": 6, "when": {"use_moe": True}}},
        "fixed": {"hidden_width": 16}}
PBT = {"type": "pbt", "perturbation_interval": 1, "mutate": ["lr_generator"]}
TWO = [{"metric": "mean_separation", "mode": "min"}, {"metric": "gen_time_ms", "mode": "min"}]


def test_a_pbt_space_loads_with_random_as_its_first_population() -> None:
    spec = parse_spec({**BASE, "scheduler": PBT}, "p.yaml")
    assert spec.sampler.type == "random"
    assert (spec.scheduler.type, spec.scheduler.mutate, spec.scheduler.perturbation_interval) == \
        ("pbt", ("lr_generator",), 1)
    assert "mutate=('lr_generator',)" in repr(spec.scheduler)
    example = load_spec("zdc_swiglu_pbt")
    assert example.scheduler.type == "pbt" and "batch_size" in example.scheduler.mutate
    # the repr of a space without PBT settings (it enters the resume hash) is unchanged
    assert "mutate" not in repr(load_spec("zdc_swiglu_tiny").scheduler)


@pytest.mark.parametrize("scheduler, extra, key, words", [
    ({"type": "pbt"}, {}, "scheduler.mutate", "is required with pbt"),
    ({**PBT, "mutate": []}, {}, "scheduler.mutate", "must be a non-empty list"),
    ({**PBT, "mutate": ["hidden_width"]}, {}, "scheduler.mutate", "'hidden_width' is under fixed"),
    ({**PBT, "mutate": ["r1_weight"]}, {}, "scheduler.mutate", "'r1_weight' is not a parameter of params"),
    ({**PBT, "mutate": ["moe_experts"]}, {}, "scheduler.mutate", "'moe_experts' is conditional"),
    ({**PBT, "mutate": ["lr_generator", "lr_generator"]}, {}, "scheduler.mutate", "listed twice"),
    ({**PBT, "perturbation_interval": 0}, {}, "scheduler.perturbation_interval", "must be >= 1"),
    ({**PBT, "perturbation_interval": 4}, {}, "budget.max_epochs", "must be below the budget of 4"),
    ({**PBT, "quantile_fraction": 0.75}, {}, "scheduler.quantile_fraction", "must be in (0, 0.5]"),
    ({**PBT, "resample_probability": 1.5}, {}, "scheduler.resample_probability", "probability in [0, 1]"),
    (PBT, {"objectives": TWO}, "scheduler.type", "ranks the population on one score"),
    (PBT, {"sampler": "tpe"}, "sampler", "use random or qmc"),
])
def test_pbt_settings_are_refused_with_the_rule(scheduler: dict, extra: dict, key: str, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_spec({**BASE, "scheduler": scheduler, **extra}, "p.yaml")
    assert str(info.value).startswith(f"p.yaml: {key}:") and words in str(info.value), str(info.value)


def test_the_search_refuses_what_the_flags_make_of_a_pbt_space() -> None:
    spec = parse_spec({**BASE, "scheduler": PBT}, "p.yaml")
    detector = get_detector("zdc")
    check = dict(sampler_where="--sampler", epochs_where="--max-epochs")
    with pytest.raises(UserError, match=r"^--warm-start auto: a pbt search has no Optuna study"):
        pbt.check_search(spec, detector, warm_start="auto", **check)
    tpe = dataclasses.replace(spec, sampler=dataclasses.replace(spec.sampler, type="tpe"))
    with pytest.raises(UserError, match=r"^--sampler: pbt draws its first population at random .* 'tpe'"):
        pbt.check_search(tpe, detector, warm_start=None, **check)
    short = dataclasses.replace(spec, max_epochs=1)
    with pytest.raises(UserError, match=r"^--max-epochs: pbt perturbs every .* = 1 epochs"):
        pbt.check_search(short, detector, warm_start=None, **check)
    # --scheduler pbt on a space without mutate
    plain = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, mutate=()))
    with pytest.raises(UserError, match=r"^--scheduler pbt: pbt needs scheduler\.mutate"):
        pbt.check_search(plain, detector, warm_start=None, scheduler_where="--scheduler pbt", **check)
    pbt.check_search(spec, detector, warm_start=None, **check)  # the space itself is fine
    with pytest.raises(UserError, match=r"--study-storage sqlite:////x\.db: a pbt search keeps no Optuna study"):
        pbt.without_study("sqlite:////x.db", "sqlite:////x.db")


def test_a_mutation_that_changes_weight_shapes_is_refused_by_name() -> None:
    spec = load_spec("zdc_swiglu_pbt")
    detector = get_detector(spec.detector, **spec.geometry)
    pbt.check_shapes(spec, detector, "w")  # learning rates, loss weights, batch size: no shapes
    for name in ("hidden_width", "low_rank"):
        bad = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, mutate=(name,)))
        with pytest.raises(UserError, match=rf"^w: '{name}' changes the shapes of the model's weights"):
            pbt.check_shapes(bad, detector, "w")


def test_a_mutation_that_moves_a_phase_boundary_is_refused() -> None:
    """A two-phase family (VAE, then its RBM prior): a resumed trial continues at the copied
    epoch, so the share of the prior phase must not change under it."""
    spec = load_spec("atlas_qvae_tiny")
    detector = get_detector(spec.detector, **spec.geometry)
    share = dataclasses.replace(spec, max_epochs=8, params=(*spec.params, Param("prior_share", "float", 0.1, 0.5)),
                                scheduler=dataclasses.replace(spec.scheduler, type="pbt", mutate=("prior_share",)))
    with pytest.raises(UserError, match=r"'prior_share' changes how the family splits the 8 epochs .* vae x7, "
                                        r"prior x1; prior_share=0\.5: vae x4, prior x4"):
        pbt.check_shapes(share, detector, "w")
    pbt.check_shapes(dataclasses.replace(share, scheduler=dataclasses.replace(share.scheduler, mutate=("lr_vae",))),
                     detector, "w")


SPACE = (Param("lr", "float", 1e-5, 1e-1, log=True), Param("w", "float", 0.0, 2.0),
         Param("q", "float", 0.0, 1.0, step=0.25), Param("n", "int", 1, 6),
         Param("k", "int", 2, 64, log=True), Param("b", "categorical", choices=(32, 64, 128)),
         Param("moe", "categorical", choices=(False, True)))


def _inside(p: Param, value: Any) -> bool:
    if p.type == "categorical":
        return value in p.choices
    if p.type == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        return False
    return p.low <= value <= p.high and p.project(value) == value


@pytest.mark.parametrize("resample", [0.0, 0.25, 1.0])
def test_explore_stays_inside_the_space_and_perturbs_by_the_papers_factors(resample: float) -> None:
    explorer = pbt.Explorer(SPACE, tuple(p.name for p in SPACE), resample, seed=3)
    config: dict[str, Any] = {"lr": 1e-3, "w": 0.0, "q": 0.5, "n": 2, "k": 8, "b": 64, "moe": False, "x": "kept"}
    ops: set[str] = set()
    for _ in range(300):
        new = explorer(config)
        assert new["x"] == "kept"
        for p in SPACE:
            assert _inside(p, new[p.name]), (p, new[p.name])
            op = explorer.last_ops[p.name]
            ops.add(op)
            if op in ("* 1.2", "* 0.8") and p.name == "lr" and 1e-5 < new["lr"] < 1e-1:
                assert new["lr"] == pytest.approx(config["lr"] * float(op[2:]))
            if op in ("* 1.2", "* 0.8") and p.type == "int" and p.low < config[p.name] < p.high:
                assert new[p.name] != config[p.name]  # an integer always moves (2 * 1.2 would not)
        config = new
    if resample == 1.0:
        assert ops == {"resample"}
    elif resample == 0.0:
        assert "resample" not in ops and {"* 1.2", "* 0.8", "shift left", "shift right"} <= ops
    else:
        assert {"resample", "* 1.2", "* 0.8"} <= ops


def test_explore_is_repeatable_from_its_seed_and_pickles() -> None:
    import pickle

    config = {"lr": 1e-3, "w": 1.0, "q": 0.5, "n": 3, "k": 8, "b": 64, "moe": True}
    a = pbt.Explorer(SPACE, ("lr", "b"), 0.25, seed=7)
    b = pickle.loads(pickle.dumps(a))
    assert [a(config) for _ in range(5)] == [b(config) for _ in range(5)]


@pytest.mark.parametrize("sampler", ["random", "qmc"])
def test_the_first_population_is_the_baseline_and_seeded_draws_of_the_space(sampler: str) -> None:
    spec = parse_spec({**BASE, "scheduler": PBT, "sampler": sampler}, "p.yaml")
    baseline = {"lr_generator": 1e-3, "use_moe": False}
    population = pbt.initial_population(spec, baseline, 6, seed=1)
    assert len(population) == 6 and population[0] == baseline
    assert population == pbt.initial_population(spec, baseline, 6, seed=1)
    assert population[1:] != pbt.initial_population(spec, baseline, 6, seed=2)[1:]
    by_name = {p.name: p for p in spec.params}
    for member in population:
        assert set(member) == {"lr_generator", "use_moe"} | ({"moe_experts"} if member["use_moe"] else set())
        assert all(_inside(by_name[k], v) for k, v in member.items())


def test_history_tags_keep_the_latest_entries_within_mlflows_limit() -> None:
    history = [{"epoch": e, "resumed_at_epoch": e, "from_trial": "t1", "from_params": {}, "explore": {},
                "params": {"lr": e, "pad": "x" * 300}} for e in range(1, 40)]
    tags = pbt.history_tags({"lr": 39}, history)
    kept = json.loads(tags[pbt.TAG_HISTORY])
    assert len(tags[pbt.TAG_HISTORY]) <= pbt.TAG_LIMIT and kept[-1]["epoch"] == 39 and len(kept) < 39
    assert json.loads(tags[pbt.TAG_PARAMS]) == {"lr": 39}


def test_every_new_exploit_is_handed_to_the_tracker_once() -> None:
    """Synchronous PBT: one member's result makes the paused others exploit, so all are
    recorded on that result, each once."""
    from types import SimpleNamespace

    calls: list[tuple[str, dict, int]] = []
    tracker = SimpleNamespace(record_pbt=lambda t, c, h: calls.append((t, c, len(h))))
    scheduler = SimpleNamespace(history={})
    callback = pbt.PbtRecordCallback(scheduler, tracker)  # type: ignore[arg-type]
    entry = {"epoch": 1, "resumed_at_epoch": 1, "from_trial": "c", "params": {"lr": 2.0}}
    scheduler.history = {"a": [entry], "b": [{**entry, "params": {"lr": 3.0}}]}
    callback.on_trial_result(0, [], SimpleNamespace(trial_id="c"), {})
    callback.on_trial_result(0, [], SimpleNamespace(trial_id="a"), {})
    assert sorted(calls) == [("a", {"lr": 2.0}, 1), ("b", {"lr": 3.0}, 1)]
    scheduler.history["a"].append({**entry, "epoch": 2, "params": {"lr": 4.0}})
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="c"))
    assert calls[-1] == ("a", {"lr": 4.0}, 2) and len(calls) == 3


def test_the_tracker_keeps_the_history_from_before_a_resume(tmp_path: Path) -> None:
    """Ray does not checkpoint PBT's state: a resumed search's exploits start a new list,
    which the trial run's record appends to the one written before the interruption."""
    import pickle
    from types import SimpleNamespace

    from calotune.tracking.mlflow_tracker import Tracker, default_tracking_uri
    from calotune.tuning.runner import MlflowTrialCallback

    uri = default_tracking_uri(tmp_path)
    Tracker(uri, "exp", tmp_path / "artifacts").create_search("s1", {}, {})
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.1})
    first = MlflowTrialCallback(uri, "exp", "s1", str(tmp_path / "artifacts"), max_epochs=6)
    first.on_trial_start(0, [], trial)
    one = {"epoch": 2, "resumed_at_epoch": 2, "from_trial": "t2", "from_params": {"lr": 0.2},
           "explore": {"lr": "* 1.2"}, "params": {"lr": 0.24}}
    two = {**one, "epoch": 4, "resumed_at_epoch": 4, "params": {"lr": 0.288}}
    first.record_pbt("t1", {"lr": 0.24}, [one])
    first.record_pbt("t1", {"lr": 0.288}, [one, two])
    first.flush()
    second = pickle.loads(pickle.dumps(first))
    three = {**one, "epoch": 5, "resumed_at_epoch": 5, "from_trial": "t3", "params": {"lr": 0.3}}
    second.record_pbt("t1", {"lr": 0.3}, [three])
    second.flush()
    client = second.tracker.client
    run = client.get_run(second.tracker.trial_run("t1", trial.config))
    assert json.loads(run.data.tags[pbt.TAG_HISTORY]) == [one, two, three]
    assert json.loads(run.data.tags[pbt.TAG_PARAMS]) == {"lr": 0.3} and run.data.params["lr"] == "0.1"
    assert run.data.metrics[pbt.METRIC_EXPLOITS] == 3
    full = client.download_artifacts(run.info.run_id, "pbt/history.json", str(tmp_path))
    assert json.loads(Path(full).read_text()) == [one, two, three]


GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}


def test_a_resumed_trial_trains_with_its_own_learning_rate_not_the_checkpoints(tmp_path: Path) -> None:
    """Exploit hands a trial another's checkpoint under perturbed params: Adam's moments
    come from the checkpoint, its learning rates from the trial's params."""
    detector = get_detector("zdc", **GEOMETRY)
    data = split(detector.synthesize(160, seed=2), seed=0)
    ctx = TrialContext(family="zdc_swiglu", detector="zdc", geometry=GEOMETRY,
                       objectives=(("mean_separation", "min"),), max_epochs=2,
                       fixed={"hidden_width": 16, "batch_size": 64}, validation_batch=16)
    kept: list[Path] = []

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            kept.append(tmp_path / f"ckpt-{len(kept)}")
            shutil.copytree(checkpoint, kept[-1])

    donor = {"lr_generator": 1e-3, "lr_critic": 2e-3}
    train(dataclasses.replace(ctx, max_epochs=1), donor, data, report, device=torch.device("cpu"))
    donor_state = torch.load(kept[0] / TRAIN_STATE, weights_only=True)
    assert donor_state["optimizers"][1]["param_groups"][0]["lr"] == pytest.approx(1e-3)

    for params in ({"lr_generator": 1.2e-3, "lr_critic": 2e-3}, donor):
        start = len(kept)
        train(ctx, params, data, report, device=torch.device("cpu"), resume_dir=kept[0])
        state = torch.load(kept[-1] / TRAIN_STATE, weights_only=True)
        assert len(kept) == start + 1 and state["epoch"] == 2
        critic, generator = state["optimizers"]
        assert generator["param_groups"][0]["lr"] == pytest.approx(params["lr_generator"])
        assert critic["param_groups"][0]["lr"] == pytest.approx(2e-3)
        assert generator["param_groups"][0]["betas"] == (0.5, 0.9)
        # the moments carried on from the checkpoint (Adam's step counter kept counting)
        steps = [float(s["step"]) for s in generator["state"].values()]
        first = [float(s["step"]) for s in donor_state["optimizers"][1]["state"].values()]
        assert steps and all(a > b > 0 for a, b in zip(steps, first, strict=True))


def test_reapplied_settings_keep_moments_and_say_what_changed() -> None:
    from calotune.tuning.worker import optimizer_settings, reapply_optimizer_settings

    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    old.step()
    new = torch.optim.Adam([w], lr=0.3, betas=(0.5, 0.9))
    fresh = optimizer_settings([new])
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["lr"] == 0.1  # what load_state_dict does on its own
    changed = reapply_optimizer_settings([new], fresh)
    assert new.param_groups[0]["lr"] == 0.3 and new.param_groups[0]["betas"] == (0.5, 0.9)
    assert any("lr: 0.1 -> 0.3" in c for c in changed) and torch.equal(new.state[w]["exp_avg"],
                                                                         old.state[w]["exp_avg"])
    assert reapply_optimizer_settings([new], fresh) == []


# --- one real PBT search ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_pbt_search_exploits_records_it_and_trains_with_the_new_rate(tmp_path: Path) -> None:
    """4 members, 4 epochs, a perturbation after every epoch, synchronous (the population is
    ranked together, so the bottom half, less the baseline, exploits at each of epochs 1-3):
    the CLI end to end (real Ray, real MLflow). An exploit is recorded on the trial's run with the perturbed params, the
    final checkpoint of that trial holds the perturbed learning rate, and the search
    scores and registers its best trial as any other."""
    space = (ROOT / "search_spaces" / "zdc_swiglu_tiny.yaml").read_text()
    space = space.replace("name: zdc_swiglu_tiny", "name: zdc_pbt_test").replace(
        "budget: {trials: 4, max_epochs: 2}", "budget: {trials: 4, max_epochs: 4}").replace(
        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}",
        "sampler: random\nscheduler: {type: pbt, perturbation_interval: 1, quantile_fraction: 0.5, synch: true, "
        "mutate: [lr_generator, mask_loss_weight]}")
    assert "type: pbt" in space and "max_epochs: 4" in space
    (tmp_path / "pbt.yaml").write_text(space)
    proc = subprocess.run([sys.executable, "-m", "calotune.search", str(tmp_path / "pbt.yaml"), "--seed", "1"],
                          cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "held-out test mean_separation" in proc.stderr

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / '.calotune' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("zdc_pbt_test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    search = next(r for r in runs if r.data.tags.get("calotune.kind") == "search")
    assert "calotune.optuna_study" not in search.data.tags  # no Optuna study behind a population
    trials = [r for r in runs if r.data.tags.get("calotune.kind") == "trial"]
    assert len(trials) == 4 and {t.data.tags["calotune.state"] for t in trials} == {"complete"}
    exploited = [t for t in trials if pbt.TAG_HISTORY in t.data.tags]
    assert exploited, "no member exploited another in 4 epochs with a perturbation after each"
    assert sum(len(json.loads(t.data.tags[pbt.TAG_HISTORY])) for t in exploited) >= 3  # one a sync point
    names = {t.info.run_name for t in trials}
    results = tmp_path / ".calotune" / "ray_results"
    for run in exploited:
        tagged = json.loads(run.data.tags[pbt.TAG_HISTORY])
        history = json.loads(Path(client.download_artifacts(run.info.run_id, "pbt/history.json",
                                                            str(tmp_path))).read_text())
        final = json.loads(run.data.tags[pbt.TAG_PARAMS])
        assert tagged == history[-len(tagged):] and history[-1]["params"] == final
        assert {e["from_trial"] for e in history} <= names
        assert run.data.metrics[pbt.METRIC_EXPLOITS] == len(history)
        # an exploit never sends a trial back: at most one per perturbation epoch (1, 2, 3)
        assert len(history) <= 3 and all(e["resumed_at_epoch"] >= e["epoch"] for e in history)
        for entry in history:  # explore moved the copied configuration
            assert entry["params"]["lr_generator"] != entry["from_params"]["lr_generator"]
            assert 1e-4 <= entry["params"]["lr_generator"] <= 5e-3
        # MLflow params stay the initial configuration; the record holds the new one
        assert float(run.data.params["lr_generator"]) != final["lr_generator"] or len(history) > 1
        # the trial's last checkpoint trained with its final learning rate, not the copied one
        trial_dir = next(d for d in results.glob("*/*") if d.is_dir() and run.info.run_name in d.name)
        last = max(trial_dir.glob("checkpoint_*"), key=lambda d: d.name)
        state = torch.load(last / TRAIN_STATE, weights_only=True)
        assert state["optimizers"][1]["param_groups"][0]["lr"] == pytest.approx(final["lr_generator"])
    assert math.isfinite(float(search.data.metrics["best_test_mean_separation"]))
