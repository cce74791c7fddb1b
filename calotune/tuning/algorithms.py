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
one objective, never stopping the baseline trial); ``hyperband`` (Li et al. arXiv
1603.06560; synchronous brackets, trials paused and resumed from their checkpoints);
``median`` (Golovin et al. 2017, Google Vizier's median stopping rule). Schedulers rank
trials on one number, so a search with several objectives runs with ``none``.
Population-based training is not offered: it rewrites the configuration of running
trials, which Optuna's define-by-run search cannot record as its own trials.
"""

from __future__ import annotations

from typing import Any

from calotune.errors import UserError

#: sampler -> whether it handles several objectives.
SAMPLERS: dict[str, bool] = {
    "random": True, "tpe": True, "cmaes": False, "gp": True, "qmc": True, "nsga2": True, "nsga3": True,
}
SCHEDULERS = ("none", "asha", "hyperband", "median")


def default_sampler(n_objectives: int) -> str:
    """TPE for one objective, NSGA-II for several (what calotune always used)."""
    return "tpe" if n_objectives == 1 else "nsga2"


def default_scheduler(n_objectives: int) -> str:
    """ASHA for one objective; none for several (schedulers rank on one number)."""
    return "asha" if n_objectives == 1 else "none"


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
    if n_objectives > 1 and name != "none":
        raise UserError(f"{where}: scheduler {name!r} stops trials by one number, but the space has "
                        f"{n_objectives} objectives; use none (the search then compares whole trials)")


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
    if name == "tpe":
        multivariate = bool(options.get("multivariate", False))
        return samplers.TPESampler(seed=seed, multivariate=multivariate,
                                   group=multivariate and bool(options.get("group", True)))
    if name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                   warn_asynchronous_seeding=False)
    from calotune.tuning import samplers as picklable  # Tune pickles the sampler with its state

    if name == "nsga2":
        return picklable.NSGAIISampler(seed=seed)
    if name == "nsga3":
        return picklable.NSGAIIISampler(seed=seed)
    raise UserError(f"unknown sampler {name!r}")


def make_scheduler(name: str, *, metric: str, mode: str, max_t: int, grace_period: int,
                   reduction_factor: int, baseline: dict[str, Any]) -> Any:
    """The Tune scheduler ``name`` over ``training_iteration`` (epochs)."""
    from ray.tune.schedulers import FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    from calotune.tuning.runner import BaselineKeepingASHA

    if name == "asha":
        return BaselineKeepingASHA(baseline, time_attr="training_iteration", metric=metric, mode=mode,
                                   max_t=max_t, grace_period=min(grace_period, max_t),
                                   reduction_factor=reduction_factor)
    if name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                                  reduction_factor=reduction_factor)
    if name == "median":
        return MedianStoppingRule(time_attr="training_iteration", metric=metric, mode=mode,
                                  grace_period=min(grace_period, max_t), min_samples_required=3)
    return FIFOScheduler()
