"""Samplers and pruners by name, with keyword arguments from the config (`study.sampler`, `study.pruner`)."""

from __future__ import annotations

import warnings

import optuna

from models.errors import UserError, unknown
from study.config.config import PrunerSettings, SamplerSettings
from study.space.per_trial_seed import PerTrialSeedSampler
from study.space.search import SearchSpace, grid_space

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "grid": optuna.samplers.GridSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
# Keyword arguments a sampler gets unless `study.sampler.kwargs` sets them, chosen with bench/search_efficiency.py
# on the tabular benchmark of the layer-action space (bench/RESULTS.md, section 7): TPE starts modelling after the
# 3 baselines + 2 random trials, not 3 + 7 (24 vs 44 trials to within 1 point of the best on digits-permute);
# `group` (neutral there) models conditional choices (T, the slim width) with the ones they depend on.
DEFAULT_KWARGS = {
    "tpe": {"group": True, "n_startup_trials": 5},
}
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
}


def make_sampler(settings: SamplerSettings, space: SearchSpace, n_objectives: int) -> optuna.samplers.BaseSampler:
    """Build the sampler; `auto` is TPE for one objective and NSGA-II for several, with DEFAULT_KWARGS under the
    config's `kwargs`. Trial n draws with a seed derived from (`settings.seed`, n) (`kwargs.seed` wins; `seed:
    null` = unseeded), so workers sharing a study never draw alike (see `PerTrialSeedSampler`); QMC keeps one seed
    for its one sequence."""
    name = settings.name if settings.name != "auto" else ("tpe" if n_objectives == 1 else "nsga2")
    if name not in SAMPLERS:
        raise unknown("sampler", name, [*SAMPLERS, "auto"])
    kwargs = {**DEFAULT_KWARGS.get(name, {}), **settings.kwargs}
    if name == "grid":
        kwargs.setdefault("search_space", grid_space(space))
    seed = kwargs.pop("seed", settings.seed)
    if name == "qmc" or seed is None:
        return _construct("study.sampler", SAMPLERS[name], {**kwargs, "seed": seed})

    def factory(trial_seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # `group` is "experimental" since v2.8: a warning on every trial otherwise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[name](**kwargs, seed=trial_seed)

    return _construct("study.sampler", PerTrialSeedSampler, {"factory": factory, "seed": seed})


def make_pruner(settings: PrunerSettings) -> optuna.pruners.BasePruner:
    """Build the pruner, wrapped in PatientPruner when `patience` >= 0."""
    if settings.name not in PRUNERS:
        raise unknown("pruner", settings.name, PRUNERS)
    # `none` takes no settings: ignore kwargs left over from another pruner (`--set study.pruner.name=none`).
    kwargs = {} if settings.name == "none" else dict(settings.kwargs)
    pruner = _construct("study.pruner", PRUNERS[settings.name], kwargs)
    if settings.patience >= 0:
        with warnings.catch_warnings():  # "experimental since v2.8": years old, and a warning on every worker start
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            pruner = optuna.pruners.PatientPruner(pruner, patience=settings.patience)
    return pruner


def _construct(where: str, cls, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{where}.kwargs: {cls.__name__} does not accept them: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{where}.kwargs: {exc}") from None
