"""Creating, loading, inspecting, exporting and deleting studies. The resolved config lives in the study's user
attributes, so a worker needs only the study's name and storage URL."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from datetime import datetime

import optuna

from models.errors import UserError, did_you_mean
from objectives.keys import stable_hash
from study.config.allowed_imports import ATTR, narrow_to_study, packages_of
from study.config.config import OBJECTIVES, Config, config_from_dict
from study.config.names import check_study_name
from study.space.baselines import BASELINES, baseline_choices, enqueue_params
from study.space.search import active_params
from study.trials.record import TrialRecord, baseline_attrs
from study.workers.storage import mask_url, open_storage

# Workers print their own line per trial (with the failure reason); Optuna's warnings would repeat them, with a
# traceback for every interrupted trial.
optuna.logging.set_verbosity(optuna.logging.ERROR)


def config_hash(config: Config) -> str:
    """Identifies a config: `--load-if-exists` refuses a different one."""
    data = config.to_dict()
    # Run-time settings, not the study's identity: how far to run it, how to confirm it, how long a worker waits
    # for its database or, stopping, for its tracking writes.
    data["study"] = {k: v for k, v in data["study"].items()
                     if k not in ("name", "storage", "n_trials", "confirm", "storage_retry")}
    data["tracking"] = {k: v for k, v in data["tracking"].items() if k != "exit_wait"}
    return stable_hash(data)


def storage_for(url: str, config: Config | None = None, create: bool = True):
    s = config.study if config else None
    return open_storage(url, heartbeat_interval=s.heartbeat_interval if s else None,
                        grace_period=s.grace_period if s else None, max_retry=s.max_retry if s else None,
                        create=create, **({"retry_window": s.storage_retry} if s else {}))


def create_study(config: Config, name: str, url: str, load_if_exists: bool = False) -> tuple[optuna.Study, bool]:
    """Create study `name` from a validated config: store the config, enqueue the baselines.
    Returns (study, created)."""
    check_study_name(name, creating=True)
    if config.search.is_empty():
        raise UserError("search: every choice is pinned, so there is nothing to search (use `trial run` instead)")
    from study.space.samplers import make_pruner, make_sampler

    directions = [OBJECTIVES[o] for o in config.study.objective]
    make_sampler(config.study.sampler, config.search, len(directions))  # fail on bad sampler before creating
    make_pruner(config.study.pruner)
    config = config.with_changes("study", name=name)
    storage = storage_for(url, config)
    if name in _names(storage):
        return _existing(name, url, storage, config, load_if_exists), False
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return _existing(name, url, storage, config, load_if_exists), False
    stored = config.to_dict()
    stored["study"]["storage"] = mask_url(url)  # workers get the URL from --storage; never keep a password here
    study.set_user_attr("config", stored)
    study.set_user_attr("objective", list(config.study.objective))
    study.set_user_attr("created", datetime.now().isoformat(timespec="seconds"))
    study.set_user_attr(ATTR, packages_of(stored))  # the user packages its workers may import (allowed_imports.py)
    if config.study.baselines:
        for baseline in BASELINES:
            choices = baseline_choices(baseline, config.search)
            params = enqueue_params(choices, config.search, config.pipeline.replace_with)
            study.enqueue_trial(params, user_attrs=baseline_attrs(baseline))
    # Written last: a worker that finds the hash knows the study is complete (config stored, baselines queued).
    study.set_user_attr("config_hash", config_hash(config))
    return study, True


def _existing(name: str, url: str, storage, config: Config, load_if_exists: bool,
              wait_seconds: float = 30.0) -> optuna.Study:
    """The existing study, if its stored config is this one (waiting briefly for a creator still writing it)."""
    if not load_if_exists:
        raise UserError(f"study '{name}' already exists in {mask_url(url)} (use --load-if-exists to reuse it)")
    study = optuna.load_study(study_name=name, storage=storage)
    deadline = time.monotonic() + wait_seconds
    while "config_hash" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    if study.user_attrs.get("config_hash") != config_hash(config):
        raise UserError(f"study '{name}' exists with a different config; choose another --name")
    return study


def _names(storage) -> list[str]:
    # Names only: summaries would read every study's trials, and fail on a study another client deletes meanwhile
    # (a shared PostgreSQL database).
    return optuna.get_all_study_names(storage)


def _find_study(name: str, url: str) -> optuna.Study:
    """Study `name` as stored, its config not read (a UserError naming the studies there when it is unknown)."""
    storage = storage_for(url, create=False)
    names = _names(storage)
    if name not in names:
        raise UserError(f"no study '{name}' in {mask_url(url)}{did_you_mean(name, names)}"
                        + (f"; studies: {', '.join(names)}" if names else "; it has no studies"))
    study = optuna.load_study(study_name=name, storage=storage)
    if "config" not in study.user_attrs:
        raise UserError(f"study '{name}' was not created by distillstudy (no stored config)")
    return study


def load_study(name: str, url: str, with_heartbeat: bool = False) -> tuple[optuna.Study, Config]:
    """Load study `name` and its stored config (a UserError naming the studies there when it is unknown)."""
    study = _find_study(name, url)
    narrow_to_study(name, study.user_attrs)  # before reading the config imports anything of it
    config = config_from_dict(study.user_attrs["config"])
    if with_heartbeat:
        from study.space.samplers import make_pruner, make_sampler

        storage = storage_for(url, config)
        # The sampler seeds each trial by its number (unique in the study), so parallel workers never propose
        # alike from a shared seed, and one worker stays reproducible.
        study = optuna.load_study(study_name=name, storage=storage,
                                  sampler=make_sampler(config.study.sampler, config.search,
                                                       len(config.study.objective)),
                                  pruner=make_pruner(config.study.pruner))
    return study, config


def list_studies(url: str) -> list[dict]:
    """Every study in the storage with its trial counts and best value."""
    storage = storage_for(url, create=False)
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        rows.append({"name": s.study_name, **_counts(study), "best": _best_values(study)})
    return rows


def _counts(study: optuna.Study) -> dict:
    counts = {state.name: 0 for state in optuna.trial.TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def _best_values(study: optuna.Study):
    try:
        if len(study.directions) > 1:
            return [t.values for t in study.best_trials]
        return study.best_value
    except ValueError:
        return None


def study_status(name: str, url: str) -> dict:
    """Counts by state, best so far, and the running trials with their age."""
    study, _ = load_study(name, url)
    now = datetime.now()
    running = [{"number": t.number, "age_s": round((now - t.datetime_start).total_seconds(), 1)
                if t.datetime_start else None, "params": t.params}
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    return {"name": name, "counts": _counts(study), "best": _best_values(study), "running": running}


def trial_row(t: optuna.trial.FrozenTrial) -> dict:
    """One trial as flat data: params, values, state, epochs, seconds, per-stage accuracies."""
    r = TrialRecord(t)
    row = {"number": t.number, "state": t.state.name, "values": t.values, "baseline": r.baseline,
           "best_stage": r.best_stage or "", "epochs": r.epochs, "budget": r.get("budget"),
           "epochs_to_threshold": r.get("epochs_to_threshold"), "student_params": r.get("student_params"),
           "seconds": r.get("seconds"), "failure": r.failure or r.skipped or "", "mlflow_run_id": r.mlflow_run_id or "",
           "delivered": r.delivered_note}
    row.update({f"choice.{k}": v for k, v in (r.choices if r.get("choices") else {}).items()})
    for stage, acc in r.stages.items():
        for k in ("source_val_acc", "target_val_acc", "target_test_acc"):
            row[f"{stage}.{k}"] = acc[k]
    return row


def best_summary(name: str, url: str, loaded: tuple[optuna.Study, Config] | None = None) -> dict:
    """The winner (or the Pareto front) with its layer actions, hyperparameters and accuracies, beside the
    baselines. `loaded`: the study and its config, when the caller has them already."""
    study, config = loaded or load_study(name, url)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study '{name}' has no completed trial yet")

    def row(t: optuna.trial.FrozenTrial) -> dict:
        # `active`: the choices that mattered to this trial, which is all the winner line shows.
        r = TrialRecord(t)
        active = active_params(config.search, config.pipeline.replace_with, r.trial_choices()) \
            if r.get("choices") else []
        return {**trial_row(t), "active": active}

    baselines = [row(t) for t in complete if TrialRecord(t).baseline]
    if len(study.directions) > 1:
        return {"name": name, "objective": config.study.objective,
                "pareto_front": [row(t) for t in study.best_trials], "baselines": baselines}
    search_best = row(study.best_trial)
    return {"name": name, "objective": config.study.objective, **study_answer(name, url, study, search_best, row),
            "baselines": baselines}


def study_answer(name: str, url: str, study: optuna.Study, search_best: dict, row) -> dict:
    """`best`: the study's answer as a trial row (`row(trial)`), and `answer`: whether it is confirmed. Once every
    confirmation run finished, the answer is the verdict's configuration (the search trial it came from, or the
    baseline's trial); before, the search's best trial `search_best`, unconfirmed."""
    from study.confirm.confirmation import answer, load_summary

    confirmed = answer(load_summary(name, url))
    if confirmed is None:
        return {"best": search_best, "answer": {"state": "unconfirmed", "trial": search_best["number"],
                                                "confirm": f"distillstudy study confirm {name}"}}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    source = trials.get(confirmed["trial"])
    best = row(source) if source is not None else None
    return {"best": best, "search_best": search_best,
            "answer": {k: v for k, v in confirmed.items() if k != "confirmation"} | {
                "confirmation": {k: v for k, v in confirmed["confirmation"].items() if k != "run_ids"}}}


def export_trials(name: str, url: str, fmt: str) -> str:
    """All trials as CSV or JSON text."""
    check_study_name(name)
    study, _ = load_study(name, url)
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return out.getvalue()


def delete_study(name: str, url: str) -> list[str]:
    """Delete study `name` from the storage with its stage checkpoints, and its confirmation study (which belongs
    to it) likewise: a study created later under the same name starts from nothing of this one's. Its config is
    read as stored, never built, so deleting imports no user module. Returns the deleted studies' names."""
    from study.confirm.confirmation import confirm_name, is_companion
    from study.trials.stage_checkpoints import checkpoint_folder

    doomed = [_find_study(name, url)]
    companion = confirm_name(name)
    if companion in _names(storage_for(url, create=False)):
        loaded = _find_study(companion, url)
        if is_companion(loaded) and loaded.user_attrs.get("confirm_of") == name:
            doomed.append(loaded)
    for each in reversed(doomed):  # the companion first: never a companion without its study
        folder = checkpoint_folder(each, url)  # read before the study's record is gone
        optuna.delete_study(study_name=each.study_name, storage=storage_for(url))  # a writer: read-only is one line
        shutil.rmtree(folder, ignore_errors=True)
    return [each.study_name for each in doomed]
