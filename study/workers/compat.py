"""Every use of Optuna's internals, in one place to update when Optuna changes.

Written against Optuna 5.0. Each function says which internal it touches, why the public API does not do, and what
to look for when upgrading.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

Pop = Callable[[], "int | None"]  # Study._pop_waiting_trial_id: the id of the popped enqueued trial, or None


def wrap_queue_pop(study: optuna.Study, wrapper: Callable[[Pop], Pop]) -> None:
    """Replace `Study._pop_waiting_trial_id` (private) by `wrapper(original)`.

    Optuna pops an enqueued trial with a read, then a conditional write, and SQLite ignores SELECT ... FOR UPDATE,
    so two workers can pop the same enqueued trial and the second `tell` fails ("Cannot tell a COMPLETE trial",
    optuna/optuna#4002). There is no public hook around the pop. On upgrade: check the method still exists and is
    what `Study.ask` calls for enqueued trials."""
    study._pop_waiting_trial_id = wrapper(study._pop_waiting_trial_id)


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats: `optuna.storages._heartbeat.is_heartbeat_enabled` (not
    exported in Optuna 5.0) on `Study._storage`. On upgrade: look for a public equivalent."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def trial_system_attrs(trial: optuna.Trial) -> dict:
    """A running trial's system attributes (where Optuna's retry callback notes `failed_trial`): Optuna 5's `Trial`
    no longer exposes them, the storage still has them (`Trial.study._storage`, `Trial._trial_id`)."""
    return trial.study._storage.get_trial(trial._trial_id).system_attrs


def trial_state(trial: optuna.Trial) -> optuna.trial.TrialState:
    """A running trial's state as the storage has it now (another worker may have failed it): `Trial` has no
    state in Optuna 5, the storage does (`Trial.study._storage`, `Trial._trial_id`)."""
    return trial.study._storage.get_trial(trial._trial_id).state


def distribution_contains(dist: optuna.distributions.BaseDistribution, value) -> bool:
    """Whether `value` is inside `dist`: `BaseDistribution._contains` (private; no public check exists) on its
    internal representation. False for a value the distribution cannot even represent."""
    if value is None:
        return False
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage (`Study._study_id`, private): unlike its name, never shared by two studies alive
    at once in one storage. Optuna 5.0 exposes no public accessor; on upgrade look for one."""
    return study._study_id
