"""Population-based training (Jaderberg et al. arXiv 1711.09846) as a calotune scheduler.

A population of ``trials`` configurations trains at once. Every ``perturbation_interval``
epochs a trial is ranked against the others on its latest validation score: one in the
bottom ``quantile_fraction`` copies the checkpoint (weights, optimiser state, best model
so far) of one in the top fraction (*exploit*) and continues from it with that trial's
configuration perturbed (*explore*): numbers times 0.8 or 1.2, a categorical moved to a
neighbouring choice, or with ``resample_probability`` a fresh draw from the parameter's
domain. The weights survive the copy, so only parameters that leave the model's shapes
alone may be mutated (``scheduler.mutate``; checked by building the model, see
:func:`check_shapes`).

Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining` does the bookkeeping.
It refuses any search algorithm (an Optuna searcher included): the configurations of
running trials change under it, which a define-by-run study cannot record as its own
trials. So the first population is drawn here, from the space's own define-by-run
function (an in-memory Optuna study with the random or QMC sampler, seeded by the
search's seed; the baseline configuration is one member), and handed to Tune's
``BasicVariantGenerator`` as fixed points: each trial receives the same flat parameter
dict as under any other scheduler. There is no Optuna study to mirror.

Ranking is on ``<objective>_epoch`` (this epoch's score): the reported ``<objective>`` is
the trial's running best, which an exploiting trial inherits from the one it copied.
The baseline trial never exploits (it stays the default configuration that the search
reports against), but may be copied.

Each exploit is recorded as it happens (:class:`PbtRecordCallback`): the trial's MLflow
run keeps its initial parameters as params (MLflow params are immutable) and gets tag
``calotune.pbt_history`` (JSON list of ``{epoch, resumed_at_epoch, from_trial,
from_params, explore, params}``), tag ``calotune.pbt_params`` (the configuration it
trains with now, so its final one at the end), metric ``pbt_exploits`` and artifact
``pbt/history.json`` (the whole history, should the tag be cut at MLflow's limit).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import random
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator, _TrialIterator

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: Ray's (and the paper's) perturbation factors for a numeric parameter.
PERTURBATION_FACTORS = (1.2, 0.8)
#: Samplers that may draw the first population: no model of results to feed.
POPULATION_SAMPLERS = ("random", "qmc")
#: MLflow tags of a trial run.
TAG_HISTORY = "calotune.pbt_history"
TAG_PARAMS = "calotune.pbt_params"
METRIC_EXPLOITS = "pbt_exploits"
#: Longest tag value written (MLflow's SQL store allows 8000, its file store 5000).
TAG_LIMIT = 4900


# --- validation ------------------------------------------------------------------------
def check_settings(scheduler: dict[str, Any], params: tuple, fixed: dict[str, Any], n_objectives: int,
                   sampler: str, max_epochs: int, where: str) -> dict[str, Any]:
    """The pbt keys of a ``scheduler`` section checked; returns them normalised.

    With ``type: pbt`` everything a PBT search needs is checked (one objective, a random
    or QMC first population, a non-empty ``mutate``, an interval below ``max_epochs``);
    the keys of another type are only checked for themselves (they are read when
    ``--scheduler pbt`` selects PBT, and checked again then, see :func:`check_search`).
    """
    is_pbt = scheduler.get("type") == "pbt"
    key = f"{where}: scheduler"
    out: dict[str, Any] = {}
    interval = scheduler.get("perturbation_interval", 2)
    if interval < 1:
        raise UserError(f"{key}.perturbation_interval: must be >= 1 (epochs between two exploit/explore "
                        f"steps), but got {interval}")
    out["perturbation_interval"] = int(interval)
    quantile = scheduler.get("quantile_fraction", 0.25)
    if not 0 < quantile <= 0.5:
        raise UserError(f"{key}.quantile_fraction: must be in (0, 0.5] (the bottom fraction copies the "
                        f"top one, which cannot overlap), but got {quantile}")
    out["quantile_fraction"] = float(quantile)
    resample = scheduler.get("resample_probability", 0.25)
    if not 0 <= resample <= 1:
        raise UserError(f"{key}.resample_probability: must be a probability in [0, 1], but got {resample}")
    out["resample_probability"] = float(resample)
    out["synch"] = bool(scheduler.get("synch", False))
    out["mutate"] = _check_mutate(scheduler.get("mutate"), params, fixed, f"{key}.mutate", required=is_pbt)
    if is_pbt:
        check_search_shape(out, n_objectives, sampler, max_epochs, where=f"{key}.type",
                           sampler_where=f"{where}: sampler", epochs_where=f"{where}: budget.max_epochs")
    return out


def _check_mutate(mutate: Any, params: tuple, fixed: dict[str, Any], where: str, *, required: bool) -> tuple[str, ...]:
    example = next((p.name for p in params if p.type != "categorical" and not p.when), None) or "lr"
    if mutate is None:
        if required:
            raise UserError(f"{where}: is required with pbt: the parameters explore perturbs after an "
                            f"exploit (ones that leave the weights' shapes alone), e.g. mutate: [{example}]")
        return ()
    if not isinstance(mutate, list | tuple) or (required and not mutate):
        raise UserError(f"{where}: must be a non-empty list of parameter names of params, e.g. "
                        f"[{example}], but got {mutate!r}")
    by_name = {p.name: p for p in params}
    seen: list[str] = []
    for name in mutate:
        if not isinstance(name, str):
            raise UserError(f"{where}: entries must be parameter names, but got {name!r}")
        if name in fixed:
            raise UserError(f"{where}: {name!r} is under fixed, so there is nothing to perturb; move it "
                            f"to params with a range, or remove it from mutate")
        if name not in by_name:
            raise UserError(f"{where}: {name!r} is not a parameter of params; choose among "
                            f"{sorted(by_name)}")
        if by_name[name].when:
            raise UserError(f"{where}: {name!r} is conditional (when: {by_name[name].when}); a perturbed "
                            f"parent could switch the branch under a running model, so PBT mutates only "
                            f"unconditional parameters; remove it from mutate")
        if name in seen:
            raise UserError(f"{where}: {name!r} is listed twice")
        seen.append(name)
    return tuple(seen)


def check_search_shape(settings: dict[str, Any], n_objectives: int, sampler: str, max_epochs: int, *,
                       where: str, sampler_where: str, epochs_where: str) -> None:
    """What a PBT search needs besides its own keys: one objective, a random/QMC first
    population, a perturbation interval below the epoch budget."""
    if n_objectives > 1:
        raise UserError(f"{where}: pbt ranks the population on one score, but the space has {n_objectives} "
                        f"objectives; use moasha or none, or keep one objective")
    if not settings.get("mutate"):
        raise UserError(f"{where}: pbt needs scheduler.mutate in the space (the parameters explore perturbs, "
                        f"e.g. mutate: [lr_generator])")
    if sampler not in POPULATION_SAMPLERS:
        raise UserError(f"{sampler_where}: pbt draws its first population at random ({' or '.join(POPULATION_SAMPLERS)}"
                        f"), then exploit/explore replaces the sampler, but the sampler is {sampler!r}; "
                        f"use random or qmc")
    if settings["perturbation_interval"] >= max_epochs:
        raise UserError(f"{epochs_where}: pbt perturbs every scheduler.perturbation_interval = "
                        f"{settings['perturbation_interval']} epochs, which must be below the budget of "
                        f"{max_epochs} epoch(s), or no trial ever exploits another; lower the interval or "
                        f"raise max_epochs")


def check_search(spec: Any, detector: Any, *, sampler_where: str, epochs_where: str,
                 warm_start: str | None, scheduler_where: str | None = None) -> None:
    """A PBT search checked once its sampler, scheduler and budget are final (after the
    flags), before Ray starts: the rules of :func:`check_search_shape`, no warm start, and
    :func:`check_shapes`. Nothing to do for another scheduler. ``scheduler_where`` names
    the flag that chose pbt (default: the space's ``scheduler.type``)."""
    s = spec.scheduler
    if s.type != "pbt":
        return
    where = f"{spec.source}: scheduler"
    check_search_shape({"mutate": s.mutate, "perturbation_interval": s.perturbation_interval},
                       len(spec.objectives), spec.sampler.type, spec.max_epochs,
                       where=scheduler_where or f"{where}.type",
                       sampler_where=sampler_where, epochs_where=epochs_where)
    if warm_start is not None:
        raise UserError(f"--warm-start {warm_start}: a pbt search has no Optuna study to seed (its first "
                        f"population is drawn at random and then evolves); drop --warm-start, or use "
                        f"another scheduler")
    check_shapes(spec, detector, f"{where}.mutate")


def check_shapes(spec: Any, detector: Any, where: str) -> None:
    """Refuse a mutated parameter that changes the shapes of the model's weights, or the
    split of the epoch budget into the family's phases.

    An exploiting trial loads another trial's weights into a model built from its own,
    perturbed configuration: ``load_state_dict`` fails if a shape differs. The model is
    built at the baseline configuration with the parameter at the ends of its range (every
    choice of a categorical) and the state_dicts' keys and shapes compared, and the phase
    of every epoch (a resumed trial continues at the copied epoch in the phase its own
    configuration puts there: a mutated ``prior_share`` would move the boundary). Trainer
    parameters (batch_size, ...) build no weights and always pass.
    """
    from calotune.models.registry import build_model
    from calotune.spec import TRAINER_PARAMS
    from calotune.tuning.orchestrate import baseline_config

    base = {**spec.fixed, **baseline_config(spec)}
    base = {k: v for k, v in base.items() if k not in TRAINER_PARAMS}
    by_name = {p.name: p for p in spec.params}
    for name in spec.scheduler.mutate:
        if name in TRAINER_PARAMS:
            continue
        p = by_name[name]
        values = list(p.choices) if p.type == "categorical" else [p.low, p.high]
        shapes: dict[str, Any] = {}
        schedules: dict[str, Any] = {}
        for value in values:
            model = build_model(spec.family, {**base, name: p.project(value)}, detector)
            schedules[repr(value)] = _schedule(model, spec)
            if len(set(schedules.values())) > 1:
                raise UserError(
                    f"{where}: {name!r} changes how the family splits the {spec.max_epochs} epochs into its "
                    f"phases ({name}={values[0]!r}: {schedules[repr(values[0])]}; {name}={value!r}: "
                    f"{schedules[repr(value)]}); an exploiting trial resumes at the copied epoch, whose "
                    f"phase would differ, so PBT cannot mutate it: remove it from mutate")
            got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
            if shapes and got != shapes[next(iter(shapes))]:
                first = next(iter(shapes))
                diff = sorted(k for k in set(got) | set(shapes[first])
                              if got.get(k) != shapes[first].get(k))
                raise UserError(
                    f"{where}: {name!r} changes the shapes of the model's weights ({name}={first} and "
                    f"{name}={value!r} differ in {', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}); an "
                    f"exploiting trial could not load the weights it copies, so PBT cannot mutate it: "
                    f"remove it from mutate (it may stay in params, drawn once per trial)")
            shapes[repr(value)] = got


def _schedule(model: Any, spec: Any) -> str:
    """The model's phases over the budget, as text: "vae x6, prior x2" (or why they do not fit)."""
    from calotune.tuning.worker import phase_schedule

    try:
        epochs = phase_schedule(model.phases(), spec.train_phases, spec.max_epochs)
    except ValueError as exc:
        return f"does not fit ({exc})"
    names = [phase.name for phase, _ in epochs]
    return ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))


# --- the first population and explore ------------------------------------------------------
def initial_population(spec: Any, baseline: dict[str, Any], size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` configurations: the baseline, then draws of the space's define-by-run
    function by an in-memory Optuna study with the space's sampler (random or QMC),
    seeded by the search's seed."""
    import optuna

    from calotune.tuning.algorithms import make_sampler

    study = optuna.create_study(sampler=make_sampler(spec.sampler.type, seed))
    population = [dict(baseline)]
    while len(population) < size:
        trial = study.ask()
        population.append(spec.suggest(trial))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # drawn, never evaluated by Optuna
    return population[:size]


class Explorer:
    """PBT's explore step over the typed space (Ray's ``custom_explore_fn``).

    For each mutated parameter: with ``resample_probability`` a fresh draw from its
    domain (log-uniform on a log range); otherwise a number is multiplied by 0.8 or 1.2
    (a linear range's zero, which no factor moves, is shifted by 20 % of the range) and an
    integer moves by at least one; a categorical moves to a neighbouring choice. The result
    is projected onto the declared domain (clipped, on its step, rounded for an int), so
    every configuration stays a point of the space. A picklable object with its own
    seeded generator: Tune stores the scheduler with the experiment.
    """

    def __init__(self, params: tuple, mutate: tuple[str, ...], resample_probability: float, seed: int) -> None:
        by_name = {p.name: p for p in params}
        self.params = tuple(by_name[name] for name in mutate)
        self.resample_probability = float(resample_probability)
        self.rng = random.Random(seed)
        #: parameter -> what the last call did ("* 1.2", "resample", "shift left", ...)
        self.last_ops: dict[str, str] = {}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        new = dict(config)
        self.last_ops = {}
        for p in self.params:
            new[p.name], self.last_ops[p.name] = self._explore(p, config[p.name])
        return new

    def _explore(self, p: Any, value: Any) -> tuple[Any, str]:
        rng = self.rng
        if rng.random() < self.resample_probability:
            return self._resample(p), "resample"
        if p.type == "categorical":
            choices = list(p.choices)
            index = choices.index(value) if value in choices else rng.randrange(len(choices))
            shift = rng.choice((-1, 1))
            return choices[min(max(index + shift, 0), len(choices) - 1)], f"shift {'left' if shift < 0 else 'right'}"
        factor = rng.choice(PERTURBATION_FACTORS)
        moved = value * factor
        if moved == value and not p.log:  # zero: no factor moves it
            moved = value + (factor - 1.0) * (p.high - p.low)
        if p.type == "int":
            moved = round(moved)
            if moved == value:  # small integers: 2 * 1.2 rounds back to 2
                moved = value + (1 if factor > 1 else -1)
        return p.project(moved), f"* {factor}"

    def _resample(self, p: Any) -> Any:
        rng = self.rng
        if p.type == "categorical":
            return rng.choice(list(p.choices))
        if p.log:
            value = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            value = rng.uniform(p.low, p.high)
        if p.type == "int":
            value = min(max(round(value), int(p.low)), int(p.high))
        return p.project(value)


# --- the scheduler and its record -------------------------------------------------------------
class CalotunePBT(PopulationBasedTraining):
    """Ray's asynchronous PBT that keeps the baseline trial's configuration and writes
    down every exploit (``history``: trial id -> list of entries, read by
    :class:`PbtRecordCallback`)."""

    def __init__(self, baseline: dict[str, Any], explorer: Explorer, mutate: tuple[str, ...], max_t: int,
                 **kwargs: Any) -> None:
        super().__init__(custom_explore_fn=explorer, **kwargs)
        self._max_t = int(max_t)
        self._baseline = dict(baseline)
        self._explorer = explorer
        self._mutate = tuple(mutate)
        self.history: dict[str, list[dict[str, Any]]] = {}

    def on_trial_result(self, tune_controller, trial, result):  # type: ignore[override]
        """A trial's last epoch is not a perturbation point: an exploit there would hand it a
        configuration it never trains with (and Ray's PBT would restart it for nothing)."""
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):  # type: ignore[override]
        # The baseline's held-out score is what the search reports the best trial against:
        # it keeps training its own configuration (others may still copy it).
        if trial in lower_quantile and dict(trial.config) == self._baseline:
            lower_quantile = [t for t in lower_quantile if t is not trial]
        if trial in lower_quantile:
            # Only copy a trial whose checkpoint is at this trial's epoch or later. Ray ranks
            # the latest scores whatever their epochs; copying one behind would send this
            # trial back to retrain epochs it has done, again after every interval (a member
            # exploited 42 times in 4 epochs in the test search before this rule).
            now = self._trial_state[trial].last_train_time
            ahead = [t for t in upper_quantile if self._trial_state[t].last_train_time >= now]
            if ahead:
                upper_quantile = ahead
            else:
                lower_quantile = [t for t in lower_quantile if t is not trial]
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _exploit(self, tune_controller, trial, trial_to_clone):  # type: ignore[override]
        epoch = self._trial_state[trial].last_train_time
        resumed_at = self._trial_state[trial_to_clone].last_train_time
        donor = {k: trial_to_clone.config.get(k) for k in self._mutate}
        super()._exploit(tune_controller, trial, trial_to_clone)
        config = dict(trial.config)
        entry = {"epoch": int(epoch), "resumed_at_epoch": int(resumed_at), "from_trial": trial_to_clone.trial_id,
                 "from_params": donor, "explore": dict(self._explorer.last_ops), "params": config}
        self.history.setdefault(trial.trial_id, []).append(entry)
        changes = ", ".join(f"{k} {donor[k]!r} -> {config[k]!r} ({self._explorer.last_ops.get(k, '')})"
                            for k in self._mutate)
        log.info("pbt: %s (epoch %d) copies %s (epoch %d) and explores: %s", trial.trial_id, epoch,
                 trial_to_clone.trial_id, resumed_at, changes)


class PbtRecordCallback(Callback):
    """Hand each new exploit to the MLflow trial callback as it happens.

    The scheduler decides on a result before Tune's callbacks see it, so the exploits that
    a result triggered are in the history when that result arrives here: in synchronous
    mode the last member's result makes the others (paused) exploit too, so every trial's
    history is looked at, not only the reporting one's. A tracker callback without
    ``record_pbt`` (a test's plain Callback) records nothing.
    """

    def __init__(self, scheduler: CalotunePBT, tracker_callback: Any) -> None:
        self.scheduler = scheduler
        self.tracker_callback = tracker_callback
        self._written: dict[str, int] = {}

    def _record_new(self) -> None:
        record = getattr(self.tracker_callback, "record_pbt", None)
        for trial_id, history in list(self.scheduler.history.items()):
            if len(history) <= self._written.get(trial_id, 0):
                continue
            self._written[trial_id] = len(history)
            if record is not None:  # the entry's params are the trial's config since that exploit
                record(trial_id, dict(history[-1]["params"]), [dict(e) for e in history])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record_new()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record_new()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_new()


def history_tags(config: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, str]:
    """The trial run's tags: the latest entries of the history that fit MLflow's limit
    (the whole of it is the ``pbt/history.json`` artifact) and the configuration now."""
    kept = list(history)
    text = json.dumps(kept, default=str)
    while len(text) > TAG_LIMIT and len(kept) > 1:
        kept = kept[1:]
        text = json.dumps(kept, default=str)
    if len(text) > TAG_LIMIT:
        text = json.dumps([{k: kept[-1][k] for k in ("epoch", "resumed_at_epoch", "from_trial", "explore")}],
                          default=str)
    return {TAG_HISTORY: text, TAG_PARAMS: json.dumps(config, default=str)[:TAG_LIMIT]}


def make_search(spec: Any, *, baseline: dict[str, Any], trials: int, seed: int, metric: str, mode: str,
                max_epochs: int, tracker_callback: Any) -> tuple[Any, CalotunePBT, list[Callback]]:
    """(search algorithm, scheduler, extra callbacks) of a PBT search over ``spec``."""
    s = spec.scheduler
    population = initial_population(spec, baseline, trials, seed)
    explorer = Explorer(spec.params, s.mutate, s.resample_probability, seed)
    scheduler = CalotunePBT(
        baseline, explorer, s.mutate, max_epochs, time_attr="training_iteration", metric=f"{metric}_epoch", mode=mode,
        perturbation_interval=s.perturbation_interval, quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability, perturbation_factors=PERTURBATION_FACTORS,
        # an unscoreable epoch (a VQ-VAE's autoencoder stage) carries no score: not ranked
        require_attrs=False, log_config=False, synch=s.synch)
    return PopulationGenerator(population), scheduler, [PbtRecordCallback(scheduler, tracker_callback)]


class _PopulationIterator(_TrialIterator):
    """Tune trials whose configs are the population's members, as they are.

    Tune's own ``points_to_evaluate`` only fills keys its ``param_space`` declares, so a
    member without a conditional parameter (inactive in its branch) could not be one: here
    the member is the trial's whole config, the shape every other scheduler gives it.
    """

    def __init__(self, population: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.population = [dict(m) for m in population]

    def __next__(self):
        if not self.population:
            raise StopIteration
        spec = copy.deepcopy(self.unresolved_spec)
        spec["config"] = self.population.pop(0)
        return self.create_trial({}, spec)


class PopulationGenerator(BasicVariantGenerator):
    """Tune's basic generator over a fixed population (no searcher: PBT refuses one).

    Every member is created at once (no concurrency limit here): PBT ranks the whole
    population, and a member waiting for resources is one of it.
    """

    def __init__(self, population: list[dict[str, Any]]) -> None:
        super().__init__(max_concurrent=0)
        self._population = [dict(m) for m in population]

    def add_configurations(self, experiments: Any) -> None:
        from ray.tune.experiment import _convert_to_experiment_list

        for experiment in _convert_to_experiment_list(experiments):
            iterator = _PopulationIterator(self._population, uuid_prefix=self._uuid_prefix,
                                           num_samples=len(self._population), unresolved_spec=experiment.spec,
                                           start=self._total_samples)
            self._total_samples += len(self._population)
            self._iterators.append(iterator)
            self._trial_generator = itertools.chain(self._trial_generator, iterator)


def without_study(study_storage: str | None, flag: str | None) -> None:
    """A PBT search has no Optuna study: refuse ``--study-storage``, say why none is kept."""
    if flag is not None:
        raise UserError(f"--study-storage {flag}: a pbt search keeps no Optuna study (its configurations "
                        f"change while trials run; MLflow records each exploit); drop the flag")
    if study_storage is not None:
        log.info("pbt: no Optuna study is mirrored (configurations change while trials run, which a "
                 "study cannot record); MLflow tag %s holds each trial's exploits", TAG_HISTORY)
