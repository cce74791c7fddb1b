"""Search algorithms as data: which Optuna sampler proposes trials, which Tune scheduler stops them.

A space names them (``sampler: {type: cmaes}``, ``scheduler: {type: median}``) or the
command line overrides them (``--sampler``, ``--scheduler``); both are checked against the
space before anything starts, with the rule and the fix in the message.

Samplers (Optuna 5): ``random``; ``tpe`` (Bergstra et al. 2011; ``multivariate`` and
``group`` model parameters jointly and keep conditional branches apart, Falkner et al.
arXiv 1807.01774); ``cmaes`` (Hansen, arXiv 1604.00772; numeric parameters, one
objective); ``gp`` (Gaussian-process Bayesian optimisation); ``qmc`` (scrambled Sobol
points: a space-filling sweep); ``nsga2`` (Deb et al. 2002) and ``nsga3`` (Deb & Jain
2014; reference points, for three or more objectives).

Schedulers (Ray Tune): ``none``; ``asha`` (Li et al. arXiv 1810.05934; the default for
one objective, never stopping the baseline trial); ``moasha`` (Schmucker et al. arXiv
2106.12639: ASHA whose rungs rank trials by non-dominated sorting with an epsilon-net
tie-break, :mod:`calotune.tuning.moasha`; the default for several objectives);
``hyperband`` (Li et al. arXiv 1603.06560; synchronous brackets, trials paused and resumed
from their checkpoints); ``median`` (Golovin et al. 2017, Google Vizier's median stopping
rule). asha, hyperband and median rank trials on one number, so a search with several
objectives takes moasha or none.

Data size as a fidelity (``scheduler: {type: asha, data_fractions: [0.25, 0.5, 1.0]}``,
asha or moasha): a trial trains on the first fraction of the training events until its
first rung, on the second until the next, and so on (the last must be 1: the trials that
survive every rung train on all the data). A rung then costs less than a full-data epoch
budget, as in data-subset fidelities (Klein et al. arXiv 1605.07079), while the trials
compared at one rung have trained on the same schedule. :func:`epoch_fractions` turns the
list into one fraction per epoch for the worker.
Population-based training (``scheduler: {type: pbt, mutate: [...]}``, Jaderberg et al.
arXiv 1711.09846; :mod:`calotune.tuning.pbt`): a population trains at once, and every
``perturbation_interval`` epochs a trial in the bottom quantile copies the checkpoint of
one in the top quantile (exploit) and perturbs the parameters in ``mutate`` (explore).
It rewrites the configuration of running trials, which Optuna's define-by-run study
cannot record as its own trials, and Ray refuses any search algorithm beside it: its
first population is drawn by the random or QMC sampler in the driver, and there is no
Optuna study. One objective only.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from calotune.errors import UserError

#: sampler -> whether it handles several objectives.
SAMPLERS: dict[str, bool] = {
    "random": True, "tpe": True, "cmaes": False, "gp": True, "qmc": True, "nsga2": True, "nsga3": True,
}
SCHEDULERS = ("none", "asha", "moasha", "hyperband", "median", "pbt")
#: Schedulers that compare several objectives (the others rank on one number).
MULTI_OBJECTIVE_SCHEDULERS = ("none", "moasha")
#: Schedulers with ASHA's rungs, on which ``data_fractions`` are defined.
RUNG_SCHEDULERS = ("asha", "moasha")


#: Samplers that draw their first ``n_startup_trials`` at random before they model the results.
STARTUP_SAMPLERS = ("tpe", "gp", "cmaes")


def default_sampler(n_objectives: int) -> str:
    """TPE for one objective, NSGA-II for several (what calotune always used)."""
    return "tpe" if n_objectives == 1 else "nsga2"


def default_scheduler(n_objectives: int) -> str:
    """ASHA for one objective; MO-ASHA for several."""
    return "asha" if n_objectives == 1 else "moasha"


def check_sampler(name: str, n_objectives: int, params: tuple, where: str) -> None:
    """Refuse a sampler the space cannot use, naming the rule and the alternatives."""
    if name not in SAMPLERS:
        raise UserError(f"{where}: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if n_objectives > 1 and not SAMPLERS[name]:
        multi = [s for s, ok in SAMPLERS.items() if ok]
        raise UserError(f"{where}: sampler {name!r} optimises one objective, but the space has "
                        f"{n_objectives}; use one of {', '.join(multi)}")
    if name == "cmaes" and params and all(p.type == "categorical" for p in params):
        raise UserError(f"{where}: sampler 'cmaes' samples numeric parameters, but every parameter "
                        f"of the space is categorical ({', '.join(p.name for p in params)}); use tpe "
                        f"or random")


def check_scheduler(name: str, n_objectives: int, where: str) -> None:
    """Refuse a scheduler the space cannot use."""
    if name not in SCHEDULERS:
        raise UserError(f"{where}: unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if n_objectives > 1 and name == "pbt":
        raise UserError(f"{where}: scheduler 'pbt' ranks the population on one score, but the space has "
                        f"{n_objectives} objectives; use moasha or none, or keep one objective")
    if n_objectives > 1 and name not in MULTI_OBJECTIVE_SCHEDULERS:
        raise UserError(f"{where}: scheduler {name!r} stops trials by one number, but the space has "
                        f"{n_objectives} objectives; use moasha (it ranks the trials at each rung by "
                        f"non-dominated sorting) or none (every trial runs to the end)")


def rung_epochs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The rungs of one ASHA bracket below ``max_t``: grace_period * eta**k epochs.

    The same milestones as Ray's ASHA bracket (which also lists ``max_t`` itself when it is
    one, but stops every trial there as finished, not by comparison).
    """
    grace = min(grace_period, max_t)
    rungs, k = [], 0
    while grace * reduction_factor**k < max_t:
        rungs.append(grace * reduction_factor**k)
        k += 1
    return rungs


def check_data_fractions(fractions: Any, scheduler: str, grace_period: int, reduction_factor: int,
                         max_epochs: int, where: str) -> tuple[float, ...]:
    """``scheduler.data_fractions`` checked: numbers in (0, 1], strictly increasing, ending at
    1, on a scheduler with rungs, at most one more than the rungs below ``max_epochs``.

    ``where`` names the file (or flag) and the key; the message says the rule, the value and
    the fix. Returns the fractions as floats.
    """
    if not isinstance(fractions, list | tuple) or not fractions:
        raise UserError(f"{where}: must be a non-empty list of fractions of the training events, e.g. "
                        f"[0.25, 0.5, 1.0], but got {fractions!r}")
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, int | float)
           or not math.isfinite(f) or not 0 < f <= 1]
    if bad:
        raise UserError(f"{where}: every fraction must be a number in (0, 1], but got {bad[0]!r} in "
                        f"{list(fractions)}")
    values = tuple(float(f) for f in fractions)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise UserError(f"{where}: fractions must increase strictly from rung to rung (a trial "
                        f"graduates to more data), but got {list(fractions)}")
    if values[-1] != 1.0:
        raise UserError(f"{where}: the last fraction must be 1 (the trials that survive every rung "
                        f"train on all the events), but got {list(fractions)}; append 1.0")
    if scheduler not in RUNG_SCHEDULERS:
        raise UserError(f"{where}: data fractions change at the rungs of {' or '.join(RUNG_SCHEDULERS)}, "
                        f"but the scheduler is {scheduler!r}; use one of those, or remove data_fractions")
    rungs = rung_epochs(grace_period, reduction_factor, max_epochs)
    if len(values) > len(rungs) + 1:
        raise UserError(
            f"{where}: {len(values)} fractions need {len(values) - 1} rungs to graduate at, but with "
            f"grace_period {grace_period}, reduction_factor {reduction_factor} and max_epochs {max_epochs} "
            f"the rungs are at epoch(s) {rungs or 'none'} ({len(rungs)}); give at most {len(rungs) + 1} "
            f"fractions, or raise the max_epochs budget")
    return values


def epoch_fractions(fractions: tuple[float, ...] | None, grace_period: int, reduction_factor: int,
                    max_epochs: int) -> tuple[float, ...] | None:
    """The fraction of the training events each epoch trains on (None: every epoch all).

    Epoch e (1-based) uses ``fractions[j]``, j the number of rungs strictly below e: up to
    and including the first rung the first fraction, after it the second, ... and the last
    one for every epoch after the rungs the list reaches.
    """
    if not fractions:
        return None
    rungs = rung_epochs(grace_period, reduction_factor, max_epochs)
    return tuple(fractions[min(sum(r < e for r in rungs), len(fractions) - 1)] for e in range(1, max_epochs + 1))


def make_sampler(name: str, seed: int, options: dict[str, Any] | None = None) -> Any:
    """The Optuna sampler ``name``, seeded."""
    import warnings

    import optuna

    options = dict(options or {})
    with warnings.catch_warnings():  # QMC, NSGA-III and TPE's group are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sampler(optuna.samplers, name, seed, options)


def _sampler(samplers: Any, name: str, seed: int, options: dict[str, Any]) -> Any:
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    startup = {"n_startup_trials": int(options["n_startup_trials"])} if options.get("n_startup_trials") else {}
    if name == "tpe":
        multivariate = bool(options.get("multivariate", False))
        return samplers.TPESampler(seed=seed, multivariate=multivariate,
                                   group=multivariate and bool(options.get("group", True)), **startup)
    if name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **startup)
    if name == "gp":
        return samplers.GPSampler(seed=seed, warn_independent_sampling=False, **startup)
    if name == "qmc":
        return samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                   warn_asynchronous_seeding=False)
    from calotune.tuning import samplers as picklable  # Tune pickles the sampler with its state

    if name == "nsga2":
        return picklable.NSGAIISampler(seed=seed)
    if name == "nsga3":
        return picklable.NSGAIIISampler(seed=seed)
    raise UserError(f"unknown sampler {name!r}")


def make_scheduler(name: str, *, metric: str | list[str], mode: str | list[str], max_t: int, grace_period: int,
                   reduction_factor: int, baseline: dict[str, Any]) -> Any:
    """The Tune scheduler ``name`` over ``training_iteration`` (epochs).

    ``metric``/``mode``: the objective, or for moasha the list of objectives and modes (a
    single-objective scheduler ranks on the first).
    """
    from ray.tune.schedulers import FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    from calotune.tuning.runner import BaselineKeepingASHA

    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] if isinstance(mode, str) else list(mode)
    if name == "moasha":
        from calotune.tuning.moasha import MOASHA

        return MOASHA(baseline, metrics=metrics, modes=modes, max_t=max_t, grace_period=grace_period,
                      reduction_factor=reduction_factor)
    metric, mode = metrics[0], modes[0]
    if name == "asha":
        return BaselineKeepingASHA(baseline, time_attr="training_iteration", metric=metric, mode=mode,
                                   max_t=max_t, grace_period=min(grace_period, max_t),
                                   reduction_factor=reduction_factor)
    if name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                                  reduction_factor=reduction_factor)
    if name == "pbt":  # needs the space's population and mutations: calotune.tuning.pbt.make_search
        raise ValueError("the pbt scheduler is made by calotune.tuning.pbt.make_search, not make_scheduler")
    if name == "median":
        return MedianStoppingRule(time_attr="training_iteration", metric=metric, mode=mode,
                                  grace_period=min(grace_period, max_t), min_samples_required=3)
    return FIFOScheduler()
