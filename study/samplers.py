"""Samplers and pruners by name, with keyword arguments from the config (`study.sampler`, `study.pruner`)."""

from __future__ import annotations

import warnings

import optuna

from models.errors import UserError, unknown

from .config import PrunerSettings, SamplerSettings
from .search import SearchSpace, grid_space

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "grid": optuna.samplers.GridSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
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


def make_sampler(settings: SamplerSettings, space: SearchSpace, n_objectives: int,
                 seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """Build the sampler; `auto` is TPE for one objective and NSGA-II for several. Its seed is
    `settings.seed + seed_offset` unless `kwargs` sets one."""
    name = settings.name if settings.name != "auto" else ("tpe" if n_objectives == 1 else "nsga2")
    if name not in SAMPLERS:
        raise unknown("sampler", name, [*SAMPLERS, "auto"])
    kwargs = dict(settings.kwargs)
    if name == "grid":
        kwargs.setdefault("search_space", grid_space(space))
    kwargs.setdefault("seed", settings.seed + seed_offset)
    return _construct("study.sampler", SAMPLERS[name], kwargs)


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
