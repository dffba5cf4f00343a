"""Confirmation: the study's top configurations and the three baselines re-run on fresh seeds, and the verdict.

A search picks its winner on one seed and a small validation split, so the winner's margin is partly luck. The
confirmation re-runs the top K distinct configurations (distinct layer actions and hyperparameters, baselines
excluded) and the three baselines on S fresh run seeds (`pipeline.seed + 1 .. + S`): new initialisation of the
students and new batch order, while the data splits and the teacher stay the study's, so selection never touches
the test split. The runs are ordinary trials of a companion Optuna study `<name>-confirm` in the same storage
(fixed choices enqueued, the run seed a user attribute), so any number of workers share them, with the heartbeat,
retry and checkpoint machinery, and each is an MLflow child run tagged `distillstudy.confirm`.

Statistics: per configuration, the mean target test and val accuracy over its seeds with a 95% Student-t interval
(mean +- t(0.975, n-1) * sd / sqrt(n); none below two seeds). The winner is the confirmed configuration with the best
mean target *val* accuracy, the best baseline likewise; the verdict compares their target *test* accuracy seed by
seed: the paired difference (same seeds) with its 95% t interval. "Beats" means that interval lies above 0.
"""

from __future__ import annotations

import json
import math
import time

import optuna
from optuna.trial import TrialState

from models.errors import UserError
from objectives.settings import TrialChoices

from .allowed_imports import ATTR
from .baselines import BASELINES, baseline_choices, enqueue_params
from .config import Config
from .names import COMPANION_SUFFIX
from .record import TrialRecord, confirm_attrs
from .studies import storage_for

SUFFIX = COMPANION_SUFFIX
LEVEL = 0.95


def confirm_name(name: str) -> str:
    """The companion study of study `name`."""
    return f"{name}{SUFFIX}"


def is_companion(study: optuna.Study) -> bool:
    """Whether `study` is a confirmation companion: it runs its enqueued trials and nothing else."""
    return "confirm_of" in study.user_attrs


def run_seeds(config: Config, seeds: int) -> list[int]:
    """The fresh run seeds: never the study's own."""
    return [config.pipeline.seed + 1 + i for i in range(seeds)]


def top_configurations(study: optuna.Study, top: int) -> list[tuple[str, int, TrialChoices | None]]:
    """(role, trial number, choices) of the `top` best distinct non-baseline configurations by value (ties: the
    earlier trial), then the three baselines (choices None for a baseline that never ran). One objective only."""
    complete = [TrialRecord(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    ranked = sorted((r for r in complete if not r.baseline and r.get("choices")),
                    key=lambda r: (-sign * r.values[0], r.number))
    seen, picked = set(), []
    for r in ranked:
        key = json.dumps(r.choices, sort_keys=True)
        if key not in seen and len(picked) < top:
            seen.add(key)
            picked.append((f"top-{len(picked) + 1}", r.number, r.trial_choices()))
    baselines = {r.baseline: r for r in map(TrialRecord, study.get_trials(deepcopy=False)) if r.baseline}
    for name in BASELINES:
        r = baselines.get(name)
        picked.append((name, r.number if r else -1, r.trial_choices() if r and r.get("choices") else None))
    return picked


def prepare(study: optuna.Study, config: Config, url: str, top: int, seeds: int) -> tuple[optuna.Study, int]:
    """Create the companion study and enqueue its trials (once: a worker that finds it loads it, waiting for
    the creator to finish enqueuing). Returns (companion, its total of trials)."""
    if len(study.directions) > 1:
        raise UserError("confirmation needs a single-objective study (a Pareto front has no one winner)")
    name, storage = confirm_name(study.study_name), storage_for(url, config)
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return _wait_ready(optuna.load_study(study_name=name, storage=storage))
    configs = top_configurations(study, top)
    if not any(role.startswith("top-") for role, _, _ in configs):  # checked before anything is written
        raise UserError(f"study '{study.study_name}' has no completed non-baseline trial to confirm")
    try:
        companion = optuna.create_study(study_name=name, storage=storage, direction=study.direction)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return _wait_ready(optuna.load_study(study_name=name, storage=storage))
    stored = json.loads(json.dumps(study.user_attrs["config"]))
    # Its runs belong in the study's own MLflow experiment, beside the trials they confirm.
    stored["tracking"]["experiment"] = config.tracking.experiment or study.study_name
    companion.set_user_attr("config", stored)
    companion.set_user_attr("confirm_of", study.study_name)
    companion.set_user_attr(ATTR, study.user_attrs.get(ATTR, []))  # its workers import what the study's may
    for role, number, choices in configs:
        choices = choices or baseline_choices(role, config.search)
        for seed in run_seeds(config, seeds):
            attrs = confirm_attrs(role, number, choices, seed, baseline=role if role in BASELINES else None)
            companion.enqueue_trial(enqueue_params(choices, config.search), user_attrs=attrs, skip_if_exists=False)
    total = len(configs) * seeds
    companion.set_user_attr("confirm_total", total)  # written last: the companion is ready
    return companion, total


def _wait_ready(companion: optuna.Study, wait_seconds: float = 60.0) -> tuple[optuna.Study, int]:
    deadline = time.monotonic() + wait_seconds
    while "confirm_total" not in companion.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    if "confirm_total" not in companion.user_attrs:
        raise UserError(f"study '{companion.study_name}' exists but was never filled (its creator died?): delete it "
                        f"with `study delete {companion.study_name} --yes` and confirm again")
    return companion, companion.user_attrs["confirm_total"]


def t_interval(values: list[float]) -> list[float] | None:
    """The 95% Student-t interval of the mean (None below two values). Written out rather than `scipy.stats.t.interval`,
    which answers NaN for seeds that all agree (zero spread), where the interval is the mean itself."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def summarize(companion: optuna.Study) -> dict:
    """The confirmation table and the verdict, from the companion's completed trials."""
    runs: dict[str, dict] = {}
    for r in map(TrialRecord, companion.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        cell = runs.setdefault(r.confirm_role, {"trial": r.confirm_of_trial, "choices": r.confirm_choices.flat(),
                                                "test": {}, "val": {}})
        cell["test"][r.seed], cell["val"][r.seed] = r.delivered["target_test_acc"], r.delivered["target_val_acc"]
    configs = []
    for role, c in runs.items():
        test, val = list(c["test"].values()), list(c["val"].values())
        configs.append({"trial": c["trial"], "role": role, "seeds": sorted(c["test"]), "choices": c["choices"],
                        "target_test_mean": _mean(test), "target_test_ci": t_interval(test),
                        "target_val_mean": _mean(val), "target_val_ci": t_interval(val)})
    return {"study": companion.study_name, "configs": configs, "verdict": verdict(configs, runs)}


def verdict(configs: list[dict], runs: dict) -> dict | None:
    """The winner (best mean target val among the confirmed top configurations) against the best baseline (the
    same rule), on target test accuracy, seed by seed."""
    tops = [c for c in configs if c["role"].startswith("top-")]
    bases = [c for c in configs if c["role"] in BASELINES]
    if not tops or not bases:
        return None
    winner = max(tops, key=lambda c: (c["target_val_mean"], -c["trial"]))
    base = max(bases, key=lambda c: (c["target_val_mean"], -list(BASELINES).index(c["role"])))
    seeds = sorted(set(runs[winner["role"]]["test"]) & set(runs[base["role"]]["test"]))
    diffs = [runs[winner["role"]]["test"][s] - runs[base["role"]]["test"][s] for s in seeds]
    diff_mean, diff_ci = (_mean(diffs), t_interval(diffs)) if diffs else (None, None)
    beats = winner["target_val_mean"] > base["target_val_mean"] and diff_ci is not None and diff_ci[0] > 0
    if beats:
        text = (f"{describe(winner['choices'])} beats {base['role']} by {100 * diff_mean:+.1f} points target test "
                f"accuracy (95% CI [{100 * diff_ci[0]:+.1f}, {100 * diff_ci[1]:+.1f}], {len(seeds)} seeds)")
    else:
        detail = "" if diff_mean is None else (
            f" (best configuration, trial {winner['trial']}: {100 * diff_mean:+.1f} points"
            + (f", 95% CI [{100 * diff_ci[0]:+.1f}, {100 * diff_ci[1]:+.1f}]" if diff_ci else "")
            + f", {len(seeds)} seeds)")
        text = f"no configuration beats {base['role']} on fresh seeds: use {base['role']}{detail}"
    return {"text": text, "winner_trial": winner["trial"] if beats else None, "best_trial": winner["trial"],
            "baseline": base["role"], "beats": beats, "seeds": seeds, "diff_mean": diff_mean, "diff_ci": diff_ci}


def describe(flat: dict) -> str:
    """`stem=finetune block1=replace ..., alpha 0.7, T 3.2` for a configuration's choices."""
    layers = " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in flat.items() if k.startswith("layers."))
    parts = [layers]
    if flat.get("recipe", "distill") != "distill":
        parts.append(f"recipe {flat['recipe']}")
    elif flat.get("alpha", 0) > 0:
        parts.append(f"alpha {flat['alpha']:.2g}, T {flat['temperature']:.2g}")
    else:
        parts.append("alpha 0")
    return ", ".join(parts)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
