"""A sampler whose randomness comes from the trial's number: `PerTrialSeedSampler`.

An Optuna sampler draws from one random stream per process. Two workers that start together on one study with
the same seed (the same config, the same trial count when they start) then draw the same stream, and their first
sampled trials are identical. The storage hands out trial numbers atomically, so seeding each trial's draws with
a seed derived from (seed, trial.number) gives every trial of a study its own stream however many workers run,
and keeps a study reproducible: the same trial number always draws the same way given the same finished trials.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, number: int) -> int:
    """Trial `number`'s sampler seed: hashed from (seed, number) by NumPy's SeedSequence, not `seed + number`, so
    studies with neighbouring seeds (a benchmark's, a study and its companion) share no trial's stream (with
    `seed + number`, seed s's trial n would draw what seed s+1's trial n-1 draws)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """Samples trial n with `factory(trial_seed(seed, n))`: a fresh sampler for that trial, dropped when it ends.

    Fit for samplers that keep their state in the study's storage (TPE, random, GP, CMA-ES, NSGA-II, grid); a
    fresh instance loses only caches (GP refits its kernel from scratch). Not for QMC, whose seed scrambles one
    sequence shared by all trials.

    Example:
        >>> sampler = PerTrialSeedSampler(lambda s: optuna.samplers.TPESampler(seed=s), seed=0)
        >>> study = optuna.create_study(sampler=sampler)
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}
        self._lock = threading.Lock()  # trials of one study object may run on several threads (`--n-jobs`)
        self.base = factory(seed)  # built now so bad keyword arguments fail before any trial; names the sampler

    def __str__(self) -> str:
        return f"{type(self.base).__name__} (seeded per trial)"

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._by_trial:
                self._by_trial[trial.number] = self._factory(trial_seed(self._seed, trial.number))
            return self._by_trial[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        # A trial told by another process (a stale trial failed by its heartbeat) was never sampled here.
        sampler = self._for(trial)
        with self._lock:
            self._by_trial.pop(trial.number, None)
        sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial draws from its own seed already."""
