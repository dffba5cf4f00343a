"""The numbers of a study report: each trial's target validation accuracy, the per-group effect table with
bootstrap intervals, and parameter importances (PED-ANOVA and fANOVA).

Bootstrap: a percentile bootstrap of the mean. For a cell with n >= 2 values x, draw `BOOTSTRAP_RESAMPLES` index
sets of size n with replacement from `numpy.random.default_rng(BOOTSTRAP_SEED)` (a fresh generator per cell, so
each cell's interval is reproducible on its own), take each resample's mean, and report the 2.5th and 97.5th
percentiles (numpy's default linear interpolation). The effect table shows an interval only from
`MIN_INTERVAL_TRIALS` trials on (a percentile bootstrap of two values is not an interval worth reading), and counts
a delivered model once: trials whose delivered weights are identical (the same `model_hash`) are one sample.
Importances are computed only from `MIN_IMPORTANCE_TRIALS` completed trials on: below that fANOVA and PED-ANOVA
disagree with each other and with themselves under a new seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from objectives.params import ACTIONS
from study.trials.record import TrialRecord
from study.workers.compat import distribution_contains

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
FANOVA_SEED = 0
MIN_INTERVAL_TRIALS = 3
MIN_IMPORTANCE_TRIALS = 20


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def target_val_acc(t: optuna.trial.FrozenTrial, objective: list[str]) -> float | None:
    """A finished trial's target validation accuracy: its value when that is the only objective, else the best
    stage's recorded `target_val_acc` (the delivered model's). None when unknown."""
    if objective == ["target_val_acc"] and t.values and _finite(t.values[0]):
        return float(t.values[0])
    value = TrialRecord(t).delivered["target_val_acc"]
    return float(value) if _finite(value) else None


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = BOOTSTRAP_LEVEL) -> list[float] | None:
    """Percentile bootstrap interval of the mean (see the module docstring); None for fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def distinct_trials(trials):
    """(trial, its TrialRecord) in trial-number order, leaving out a completed trial whose delivered model is
    identical to an earlier one's (`model_hash`): identical models count once in an effect table."""
    seen: set[str] = set()
    for t in sorted(trials, key=lambda t: t.number):
        r = TrialRecord(t)
        if t.state == TrialState.COMPLETE and r.model_hash is not None:
            if r.model_hash in seen:
                continue
            seen.add(r.model_hash)
        yield t, r


def group_effects(trials, groups: list[str], objective: list[str]) -> dict:
    """For every layer group and action: completed trials, pruned trials, mean and best target val acc, the
    bootstrap interval of the mean (from MIN_INTERVAL_TRIALS on), the best trial; per group the action with the
    best mean. Actions come from the trial's `choices` user attribute, so pinned groups and baselines count; a
    completed trial whose delivered model is identical to an earlier one's (`model_hash`) is not counted again."""
    cells: dict[str, dict[str, list]] = {g: {} for g in groups}
    pruned: dict[str, dict[str, int]] = {g: {} for g in groups}
    for t, r in distinct_trials(trials):
        for g, action in r.layers.items():
            cells.setdefault(g, {})
            pruned.setdefault(g, {})
            if t.state == TrialState.PRUNED:
                pruned[g][action] = pruned[g].get(action, 0) + 1
            elif t.state == TrialState.COMPLETE:
                acc = target_val_acc(t, objective)
                if acc is not None:
                    cells[g].setdefault(action, []).append((acc, t.number))
    return {g: _effect_rows(cells[g], pruned[g], ACTIONS) for g in cells}


def choice_effects(trials, names: list[str], objective: list[str], applies: Callable[[dict], set[str]]) -> dict:
    """The effect table of other choices (the layer term, the recipe, ...): for each name in `names` and each
    value it took, the same row as `group_effects`' (completed and pruned trials, mean and best target val acc, the
    interval from MIN_INTERVAL_TRIALS on, the best trial), and the value with the best mean. A trial counts for a
    choice only where it applied (`applies(recorded choices)` names them: the layer term of a finetune-recipe
    trial, a baseline's included, says nothing about layer terms), with the value it ran with; identical delivered
    models count once."""
    cells: dict[str, dict] = {n: {} for n in names}
    pruned: dict[str, dict] = {n: {} for n in names}
    for t, r in distinct_trials(trials):
        # Counted under what was delivered: a distill-recipe trial that delivered its finetune stage is a finetune
        # model, whose KD choices (the layer term, ...) had no say in it.
        delivered = {**r.choices, "recipe": r.delivered_recipe} if "recipe" in r.choices else r.choices
        had_a_say = applies(delivered) if r.attrs.get("choices") else set()
        for n in names:
            if n not in had_a_say or n not in delivered:  # records older than the choice have no value for it
                continue
            value = str(delivered[n])
            if t.state == TrialState.PRUNED:
                pruned[n][value] = pruned[n].get(value, 0) + 1
            elif t.state == TrialState.COMPLETE and (acc := target_val_acc(t, objective)) is not None:
                cells[n].setdefault(value, []).append((acc, t.number))
    return {n: _effect_rows(cells[n], pruned[n], ()) for n in names}


def _effect_rows(cells: dict[str, list], pruned: dict[str, int], order) -> dict:
    """One effect table's rows for one group or choice: `cells` value -> [(acc, trial)], `pruned` value -> count;
    values in `order` first, then the rest sorted."""
    values = [a for a in order if a in cells or a in pruned]
    values += sorted(a for a in set(cells) | set(pruned) if a not in values)
    rows = {}
    for a in values:
        pairs = cells.get(a, [])
        vals = [v for v, _ in pairs]
        best = max(pairs, default=None)  # ties: the later trial
        rows[a] = {"n": len(vals), "pruned": pruned.get(a, 0),
                   "mean": float(np.mean(vals)) if vals else None,
                   "best": best[0] if best else None, "best_trial": best[1] if best else None,
                   "ci95": bootstrap_ci(vals) if len(vals) >= MIN_INTERVAL_TRIALS else None}
    ranked = [a for a in rows if rows[a]["mean"] is not None]
    best_action = max(ranked, key=lambda a: rows[a]["mean"]) if ranked else None  # ties: the first
    return {"actions": rows, "best_action": best_action}


# ---- importance --------------------------------------------------------------------------------------------------
def effective_study(study: optuna.Study, trials):
    """An in-memory single-objective copy of the completed trials in which every searched parameter has the value
    the trial ran with (from its `choices` user attribute: baselines' real choices, and the default of a
    conditional parameter that was not sampled), valued by the first objective in its own direction.

    Returns (copy, params, dropped): params are every parameter sampled in any trial; dropped counts trials left
    out (no finite first objective, or a choice outside the parameter's distribution)."""
    dists: dict = {}
    for t in trials:
        for name, d in t.distributions.items():
            dists.setdefault(name, d)
    params = sorted(dists)
    copy = optuna.create_study(direction=study.directions[0])
    dropped = 0
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        values = _effective_params(t, dists) if t.values and _finite(t.values[0]) else None
        if values is None:
            dropped += 1
            continue
        copy.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=t.values[0]))
    return copy, params, dropped


def _effective_params(t: optuna.trial.FrozenTrial, dists: dict) -> dict | None:
    """The values trial `t` ran with, for every parameter in `dists` (None when one is unknown or outside its
    distribution, e.g. a baseline's choice outside the searched range)."""
    choices = TrialRecord(t).choices  # one name per choice: the parameter's
    values = {}
    for name, dist in dists.items():
        value = choices.get(name, t.params.get(name))
        if not distribution_contains(dist, value):
            return None
        values[name] = value
    return values


def importances(effective, objective: list[str]) -> dict:
    """PED-ANOVA and fANOVA importances (normalised to sum 1, unless all are 0) of every sampled parameter for the
    first objective, on `effective` = effective_study(...). Has 'skipped': reason when there is too little data."""
    copy, params, dropped = effective
    n = len(copy.trials)
    info = {"target": objective[0], "n_trials": n, "dropped_trials": dropped, "params": params}
    if not params:
        return {**info, "skipped": "no sampled parameters"}
    if n < MIN_IMPORTANCE_TRIALS:
        return {**info, "skipped": f"{n} completed trials: importances need at least {MIN_IMPORTANCE_TRIALS} to "
                                   f"mean anything (below that fANOVA and PED-ANOVA disagree)"}
    if n < 2:
        return {**info, "skipped": f"importances need at least two completed trials with all parameters ({n})"}
    if len({t.value for t in copy.trials}) == 1:
        return {**info, "skipped": f"all {n} trials have the same value: no parameter explains any of it"}
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample and experimental warnings: the report states n instead
            ped = get_param_importances(copy, evaluator=PedAnovaImportanceEvaluator(), params=params)
            fanova = get_param_importances(copy, evaluator=FanovaImportanceEvaluator(seed=FANOVA_SEED),
                                           params=params)
    except (RuntimeError, ValueError) as exc:  # e.g. fANOVA's "zero total variance in all trees"
        return {**info, "skipped": f"importance evaluation failed: {type(exc).__name__}: {exc}"[:300]}
    clean = lambda d: {k: (float(v) if _finite(v) else 0.0) for k, v in d.items()}  # noqa: E731
    return {**info, "ped_anova": clean(ped), "fanova": clean(fanova)}
