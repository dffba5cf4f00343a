"""The registered model `<study>-best`: one rule decides every new version, so its `latest` is never a worse model
than an earlier version.

Every version carries tags: `distillstudy.state` (`unconfirmed`: a search trial, the best so far on the study's
one seed; `confirmed`: the confirmation's answer), `distillstudy.value` (the search trial's objective value),
`optuna.study` and `distillstudy.trial`. The rule:

- a search trial is registered only while no version is `confirmed`, and only when its value is strictly better
  (in the study's direction) than the value of every version registered so far;
- the confirmation's answer is registered once as the `confirmed` version; after it no search trial registers.

The decision and the registration run under one file lock per tracking store (`store.registry_lock`): every
worker thread and every process of a machine sees the versions the others made. Workers on several machines
sharing one tracking server do not share that lock, so a version re-reads the registry after it is made and
deletes itself when an earlier version is at least as good (the two may have decided at the same moment).
"""

from __future__ import annotations

from filelock import FileLock
from mlflow.exceptions import MlflowException

from study.tracking import store
from study.tracking.mlflow_model import register_version

STATE, VALUE = "distillstudy.state", "distillstudy.value"


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _better(value: float, than: float, maximize: bool) -> bool:
    return value > than if maximize else value < than


def _ensure_model(client, name: str, description: str) -> None:
    try:
        client.create_registered_model(name, description=description)
    except MlflowException:
        pass  # already registered (by this worker or another): add a version


def register_search_best(client, uri: str, name: str, run_id: str, model_id: str | None,
                         value: float, maximize: bool, tags: dict) -> str | None:
    """Register a search trial's model as a new `unconfirmed` version of `name` if the rule allows it (see the
    module docstring). Returns the version made, or None."""
    with FileLock(store.registry_lock(uri), timeout=store.LOCK_TIMEOUT_S):
        versions = _versions(client, name)
        if any(v.tags.get(STATE) == "confirmed" for v in versions):
            return None  # the study is confirmed: its answer is the registered model
        values = [float(v.tags[VALUE]) for v in versions if VALUE in v.tags]
        if any(not _better(value, old, maximize) for old in values):
            return None
        _ensure_model(client, name, "the distillstudy study's answer: the best search trial until the study is "
                                    "confirmed, then the confirmation's answer (tag distillstudy.state)")
        made = _create_version(client, uri, name, run_id, model_id,
                               {**tags, STATE: "unconfirmed", VALUE: repr(float(value))})
    # Another machine's worker may have decided at the same moment, outside this lock: the later loser goes.
    for v in _versions(client, name):
        if int(v.version) < int(made.version) and (v.tags.get(STATE) == "confirmed" or (
                VALUE in v.tags and not _better(value, float(v.tags[VALUE]), maximize))):
            client.delete_model_version(name, made.version)
            return None
    return made.version


def register_answer(client, uri: str, name: str, run_id: str, model_id: str | None,
                    tags: dict) -> str:
    """Register the confirmation's answer as the `confirmed` version of `name` (once: registering the same run
    again returns its version). Returns the version."""
    with FileLock(store.registry_lock(uri), timeout=store.LOCK_TIMEOUT_S):
        for v in _versions(client, name):
            if v.tags.get(STATE) == "confirmed" and v.run_id == run_id:
                return v.version
        _ensure_model(client, name, "the distillstudy study's answer (tag distillstudy.state)")
        return _create_version(client, uri, name, run_id, model_id, {**tags, STATE: "confirmed"}).version


def _create_version(client, uri: str, name: str, run_id: str, model_id: str | None, tags: dict):
    # `register_version` points the process-wide tracking URI at this store for the call (a database registry
    # resolves a `models:/<id>` source through it) and lists the version on the logged model's page.
    return register_version(client, uri, name, run_id, model_id, tags)
