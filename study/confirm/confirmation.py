"""Confirmation: the study's top configurations and the three baselines re-run on fresh seeds, and the verdict.

A search picks its winner on one seed and a small validation split, so the winner's margin is partly luck. The
confirmation re-runs the top K distinct configurations (distinct layer actions and hyperparameters, baselines
excluded) and the three baselines on S fresh run seeds (`pipeline.seed + 1 .. + S`): new initialisation of the
students and new batch order, and with `study.confirm.resample`
- `splits` (the default): also a new train/val/test split of the task and a new teacher per seed (the run seed is
  the run's data seed too): seed s splits the data with s and trains its teacher on that split's source, cached
  once per seed and shared by every configuration on seed s, so the comparison stays paired (same split, same
  teacher) while the interval covers what a new split and a new teacher do. It costs one teacher per seed.
- `none`: every seed keeps the study's split and teacher; the interval then speaks about one split only.
Either way a run is selected on its own split's validation data and scored on that split's test data, which no
selection ever saw. The runs are ordinary trials of a companion Optuna study `<name>-confirm` in the same storage
(fixed choices enqueued, the run seed and data seed user attributes, the mode the companion's `confirm_resample`),
so any number of workers share them, with the heartbeat, retry and checkpoint machinery, and each is an MLflow child
run tagged `distillstudy.confirm`.

Statistics (study/confirm/verdict.py): per configuration, the mean target test and val accuracy over its seeds with a
95% Student-t interval clipped to [0, 1] (none below two seeds). The winner is the confirmed top configuration with the
best mean target *val* accuracy; the verdict compares it with EACH baseline on target *test* accuracy seed by seed
(paired difference, 95% t interval) and answers "use X" only for an X that beats or ties all of them.
"""

from __future__ import annotations

import json
import math
import time

import optuna
from optuna.trial import TrialState

from models.errors import UserError
from objectives.settings import TrialChoices
from study.config.allowed_imports import ATTR
from study.config.config import Config
from study.config.names import COMPANION_SUFFIX
from study.confirm.verdict import ACCURACY, describe, mean, t_interval, verdict  # noqa: F401 - re-exported for callers
from study.space.baselines import BASELINES, baseline_choices, enqueue_params
from study.trials.record import TrialRecord, confirm_attrs
from study.workers.studies import storage_for

SUFFIX = COMPANION_SUFFIX


def confirm_name(name: str) -> str:
    """The companion study of study `name`."""
    return f"{name}{SUFFIX}"


def is_companion(study: optuna.Study) -> bool:
    """Whether `study` is a confirmation companion: it runs its enqueued trials and nothing else."""
    return "confirm_of" in study.user_attrs


def run_seeds(config: Config, seeds: int) -> list[int]:
    """The fresh run seeds: never the study's own."""
    return [config.pipeline.seed + 1 + i for i in range(seeds)]


def data_seed(config: Config, resample: str, run_seed: int) -> int:
    """The seed of a confirmation run's split and teacher: its run seed (`resample: splits`) or the study's."""
    return run_seed if resample == "splits" else config.pipeline.seed


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
    resample = config.study.confirm.resample
    companion.set_user_attr("confirm_resample", resample)
    companion.set_user_attr(ATTR, study.user_attrs.get(ATTR, []))  # its workers import what the study's may
    for role, number, choices in configs:
        choices = choices or baseline_choices(role, config.search)
        for seed in run_seeds(config, seeds):
            attrs = confirm_attrs(role, number, choices, seed, data_seed(config, resample, seed),
                                  baseline=role if role in BASELINES else None)
            params = enqueue_params(choices, config.search, config.pipeline.replace_with)
            companion.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
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


def summarize(companion: optuna.Study) -> dict:
    """The confirmation table and the verdict, from the companion's completed trials. `complete`: no run of it is
    still waiting or running (the verdict is final); `resample`: how its seeds varied (the companion's
    `confirm_resample`, "none" for a companion that predates it)."""
    runs: dict[str, dict] = {}
    trials = companion.get_trials(deepcopy=False)
    for r in map(TrialRecord, (t for t in trials if t.state == TrialState.COMPLETE)):
        cell = runs.setdefault(r.confirm_role, {"trial": r.confirm_of_trial, "choices": r.confirm_choices.flat(),
                                                "test": {}, "val": {}, "run_ids": {}, "delivered": {}})
        cell["test"][r.seed], cell["val"][r.seed] = r.delivered["target_test_acc"], r.delivered["target_val_acc"]
        cell["run_ids"][r.seed] = r.mlflow_run_id
        # What each run delivered: a distill run whose finetune stage won is no evidence about distillation.
        kind = r.delivered_recipe or "?"
        cell["delivered"][kind] = cell["delivered"].get(kind, 0) + 1
    configs = []
    for role, c in runs.items():
        test, val = list(c["test"].values()), list(c["val"].values())
        configs.append({"trial": c["trial"], "role": role, "seeds": sorted(c["test"]), "choices": c["choices"],
                        "target_test_mean": mean(test), "target_test_ci": t_interval(test, ACCURACY),
                        "target_val_mean": mean(val), "target_val_ci": t_interval(val, ACCURACY),
                        "delivered": c["delivered"], "run_ids": c["run_ids"]})
    resample = companion.user_attrs.get("confirm_resample", "none")
    pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)
    return {"study": companion.study_name, "configs": configs, "verdict": verdict(configs, runs, resample),
            "resample": resample, "complete": not pending}


def load_summary(name: str, url: str) -> dict | None:
    """`summarize` of study `name`'s companion, None when it has none (never confirmed)."""
    try:
        companion = optuna.load_study(study_name=confirm_name(name), storage=storage_for(url, create=False))
    except KeyError:  # Optuna's answer for a study that does not exist
        return None
    return summarize(companion)


def answer(summary: dict | None) -> dict | None:
    """The study's confirmed answer: the verdict's configuration once every confirmation run finished, with its
    confirmation row (None before: the study's answer is then its search's best trial, unconfirmed)."""
    if not summary or not summary["complete"] or not summary["verdict"]:
        return None
    chosen = summary["verdict"]["answer"]
    row = next(c for c in summary["configs"] if c["role"] == chosen["role"])
    return {**chosen, "state": "confirmed", "text": summary["verdict"]["text"], "resample": summary["resample"],
            "description": describe(chosen["choices"]), "confirmation": row}


def registration_seed(config: Config) -> int:
    """The confirmation seed whose run of the answer is registered as `<study>-best`: the first fresh seed."""
    return run_seeds(config, 1)[0]


def configurations_of(companion: optuna.Study) -> tuple[int, int]:
    """(top configurations, baselines) the companion really runs: top K may yield fewer distinct ones."""
    roles = {TrialRecord(t).confirm_role for t in companion.get_trials(deepcopy=False)}
    roles.discard(None)
    return sum(1 for r in roles if r.startswith("top-")), sum(1 for r in roles if r in BASELINES)
