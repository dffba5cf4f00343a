"""The Optuna objective: sample choices, run the pipeline with pruning on the global step axis, record the
outcome as user attributes (and through the tracker), return the objective value(s)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from models.errors import InvalidChoice, UserError, first_line
from objectives.pipeline import TrialResult, run_trial
from objectives.settings import TrialChoices
from objectives.stages import plan_stages
from objectives.train import TrainingDiverged
from study.config.config import Config
from study.confirm.confirmation import is_companion
from study.space.baselines import baseline_choices
from study.space.pruning import is_decision_step
from study.space.search import suggest_choices
from study.tracking import NullTracker
from study.trials import record
from study.trials.record import TrialRecord
from study.trials.stage_checkpoints import trial_checkpoints
from study.workers import compat


class StudyFull(Exception):
    """The study already has its total of trials: this one is abandoned (FAIL, tagged `skipped`)."""


class TrialReclaimed(BaseException):
    """Another worker marked this worker's running trial FAIL (its heartbeat was silent past the grace period: the
    worker was paused, or cut off from the database) and queued a retry. Not an Exception on purpose: Optuna must
    let it through untold (telling a FAIL trial raises "Cannot tell a FAIL trial"), and the worker goes on."""


def objective_value(result: TrialResult, name: str) -> float:
    """One objective of a finished trial, of its delivered model. A trial that never reached the (pinned)
    threshold counts as its epoch budget + 1."""
    if name == "target_val_acc":
        return result.value
    if name == "source_val_acc":
        return result.stages[result.best_stage].source_val_acc
    if name == "student_params":
        return float(result.student_params)
    return float(result.epochs_to_threshold if result.epochs_to_threshold is not None else result.budget + 1)


def describe_failure(exc: BaseException) -> str:
    """A one-line reason for a FAIL trial."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory: " + first_line(exc, 200)
    if isinstance(exc, TrainingDiverged):
        return f"diverged: {exc}"
    if isinstance(exc, UserError):
        return f"invalid input: {exc}"  # impossible layer choices, unreadable data
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (worker stopped); retried"
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


def is_infrastructure_failure(exc: BaseException) -> bool:
    """Whether a trial failed for its worker's sake (files, disk, device, memory, a bug) rather than its own: not an
    invalid input or choice (`UserError`), not a diverged training (the recipe's own outcome on its seed)."""
    return not isinstance(exc, (UserError, TrainingDiverged))


def _finished(study: optuna.Study, below: int | None = None) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if below is None or t.number < below)


@dataclass
class _Plan:
    """What one trial runs: its choices and seeds, and what it was queued as."""

    choices: TrialChoices
    run_seed: int  # the students' initialisation and batch order
    data_seed: int  # the data split and the teacher
    queued: TrialRecord  # what an enqueued trial was queued as (a baseline, a confirmation run, a retry)

    @property
    def always_finishes(self) -> bool:
        """A baseline is the reference every verdict is read against, and a confirmation run measures a
        configuration: both report their curves but are never pruned."""
        return bool(self.queued.baseline or self.queued.confirm_choices)

    @property
    def enqueued(self) -> bool:
        """A baseline, a confirmation run or a retry: it exists once in the queue."""
        return self.always_finishes or self.queued.get("retry_of") is not None


def _plan(trial: optuna.Trial, study: optuna.Study, config: Config, confirming: bool) -> _Plan:
    """The trial's choices and seeds: sampled, a baseline's, or a confirmation run's (its enqueued choices on a
    fresh run seed, and its own data seed when the confirmation resamples the splits)."""
    pipeline = config.pipeline
    choices = suggest_choices(trial, config.search, pipeline.replace_with)  # enqueued values, for Optuna's record
    queued = TrialRecord(trial)
    run_seed = data_seed = pipeline.seed
    if queued.confirm_choices:
        choices, run_seed = queued.confirm_choices, int(queued.seed)
        data_seed = pipeline.seed if queued.data_seed is None else int(queued.data_seed)
    elif confirming:
        record.write_skipped(trial, "a confirmation study runs only its enqueued trials")
        study.stop()
        raise StudyFull("confirmation queue is empty")
    elif queued.baseline:
        choices = baseline_choices(queued.baseline, config.search)
    return _Plan(choices, run_seed, data_seed, queued)


def make_objective(config: Config, study: optuna.Study, n_trials: int, tracker=None,
                   interrupted: threading.Event | None = None, run: Callable[..., TrialResult] = run_trial):
    """The objective for `study`; it abandons trials beyond the study's total `n_trials` (so parallel workers
    stop at exactly n_trials finished trials). Setting `interrupted` stops running trials at their next epoch.
    `config.study.storage` is the study's storage URL (its stage checkpoints are the study's own).

    `run` trains one trial (`objectives.pipeline.run_trial`, whose signature it has); the tests pass a stand-in that
    reports a scripted curve or raises, to check the bookkeeping around it (pruning, failures, retries) in
    milliseconds."""
    tracker = tracker or NullTracker()
    confirming = is_companion(study)

    def objective(trial: optuna.Trial):
        # Trials numbered before this one that finished or are running: if they already make the total, stop.
        if _finished(study, below=trial.number) >= n_trials:
            record.write_skipped(trial, "study already has its total of trials")
            study.stop()
            raise StudyFull(f"study has {n_trials} trials")
        started = time.perf_counter()
        plan = _plan(trial, study, config, confirming)
        record.write_start(trial, plan.choices, plan.run_seed, plan.data_seed)
        run_id = None
        try:  # a signal while the tracker opens the run is an interrupted trial like any other (FAIL, re-queued)
            _close_stale_run(trial, tracker)
            run_id = tracker.start_trial(trial, plan.choices)
            record.write_run_id(trial, run_id)
        except KeyboardInterrupt as exc:
            _interrupted(study, trial, tracker, run_id, exc)
            raise
        checkpoints = trial_checkpoints(config, study, config.study.storage, plan.choices, plan.run_seed,
                                        plan.data_seed)
        try:  # recording the result too: a signal then is an interrupted trial, not a FAIL without a reason
            result = run(config.task, config.model, config.pipeline, plan.choices,
                         report=_reporter(trial, study, config, plan, interrupted),
                         on_epoch=lambda stage, step, metrics: tracker.log_epoch(run_id, stage, step, metrics),
                         checkpoints=checkpoints, run_seed=plan.run_seed, data_seed=plan.data_seed)
            values = _completed(trial, tracker, run_id, result, config.study.objective)
        except optuna.TrialPruned as exc:
            checkpoints.clear()
            record.write_pruned(trial, str(exc), time.perf_counter() - started)
            tracker.end_trial(run_id, trial, "PRUNED", reason=str(exc))
            raise
        except KeyboardInterrupt as exc:
            _interrupted(study, trial, tracker, run_id, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this trial only; the study goes on
            _failed(study, trial, tracker, run_id, exc, plan, config.study.max_retry)
            raise
        checkpoints.clear()
        return values

    return objective


def reclaim_aware(objective, tracker):
    """`objective`, raising TrialReclaimed when its trial turns out to be finished by someone else: Optuna refuses
    every write to it (UpdateFinishedTrialError: a report, a user attribute, the result). Its MLflow run is closed
    as FAILED, like the run of a worker that died (the retry may close it too, the same way)."""
    tracker = tracker or NullTracker()

    def run(trial: optuna.Trial):
        try:
            return objective(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            reason = "reclaimed: its heartbeat was silent past the grace period (the worker was paused or cut off)"
            tracker.end_trial(TrialRecord(trial).mlflow_run_id, None, "FAIL", reason=f"{reason}; retried")
            raise TrialReclaimed(f"trial {trial.number} was {reason}; another worker retries it") from None

    return run


def _reporter(trial: optuna.Trial, study: optuna.Study, config: Config, plan: _Plan,
              interrupted: threading.Event | None):
    """`report(step, value, stage)` for run_trial: the value to Optuna at its step, and the pruner's decision at the
    stage's decision points; a KeyboardInterrupt once `interrupted` is set."""
    multi = len(config.study.objective) > 1
    # should_prune reads the study's trials from the storage; with no pruner it would only ever say no.
    can_prune = not multi and not isinstance(study.pruner, optuna.pruners.NopPruner) and not plan.always_finishes
    stages: list = []  # the recipe's blocks on the step axis (filled once run_trial has validated choices)

    def report(step: int, value: float, stage: str) -> None:
        if interrupted is not None and interrupted.is_set():
            raise KeyboardInterrupt
        if multi:  # Optuna has no pruning for multi-objective studies
            return
        trial.report(value, step)
        if not can_prune:
            return
        if not stages:
            stages.extend(plan_stages(config.pipeline, plan.choices))
        if is_decision_step(stages, step, config.study.pruner.stage_warmup) and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({stage}, target val acc {value:.4f})")

    return report


def _failed(study: optuna.Study, trial: optuna.Trial, tracker, run_id, exc: Exception, plan: _Plan,
            max_retry: int) -> None:
    """Record a failed trial. An enqueued trial (a baseline, a confirmation run, a retry) exists once: failing it
    for the worker's sake (an unwritable cache, a full disk, a lost device) must not use it up, so it is queued
    again, at most `max_retry` times: a failure that recurs on every copy (a bug, a model too big for the device)
    must end, not loop through the queue forever."""
    again = plan.enqueued and is_infrastructure_failure(exc) and int(plan.queued.get("requeues") or 0) < max_retry
    _fail(trial, tracker, run_id, exc, "FAIL", note="; queued again" if again else "")
    if again:
        requeue(study, trial)


def _completed(trial: optuna.Trial, tracker, run_id, result: TrialResult, objectives: list[str]):
    """Record a finished trial; its objective value(s)."""
    record.write_result(trial, result)
    tracker.log_teacher(result.teacher, result.models.get("teacher"))
    if result.donor is not None:  # replace_with: donor; its weights are the cached file its run names
        tracker.log_teacher(result.donor, None)
    values = [objective_value(result, name) for name in objectives]
    tracker.end_trial(run_id, trial, "COMPLETE", result=result, value=values[0])
    return values if len(values) > 1 else values[0]


def _fail(trial, tracker, run_id, exc: BaseException, state: str, note: str = "") -> None:
    reason = describe_failure(exc) + note
    # An impossible choice is the choice's fault, not the worker's (see worker.py).
    record.write_failure(trial, reason, invalid_choice=isinstance(exc, InvalidChoice))
    if isinstance(exc, torch.OutOfMemoryError):
        gc.collect()  # drop the failed trial's tensors so the next trial can run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tracker.end_trial(run_id, trial, state, reason=reason)


def _interrupted(study, trial, tracker, run_id, exc: KeyboardInterrupt) -> None:
    _fail(trial, tracker, run_id, exc, "KILLED")
    requeue(study, trial)


def _close_stale_run(trial: optuna.Trial, tracker) -> None:
    # A retry of a trial whose worker died (heartbeat went stale) inherits the dead trial's user attributes:
    # its MLflow run was never closed, so close it as FAILED, saying why.
    failed = compat.trial_system_attrs(trial).get("failed_trial")
    stale_run = TrialRecord(trial).mlflow_run_id
    if failed is not None and stale_run:
        tracker.end_trial(stale_run, None, "FAIL",
                          reason=f"worker died (heartbeat stale); retried as trial {trial.number}")


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue `trial`'s parameters and identity again (`retry_of`, `requeues`): an interrupted trial, or an enqueued
    one failed by its worker, is not the trial's fault, so a later run retries it."""
    study.enqueue_trial(trial.params, user_attrs=record.requeue_attrs(TrialRecord(trial)), skip_if_exists=False)
