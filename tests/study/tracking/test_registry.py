"""The registered `<study>-best`: its `latest` is never a worse model than an earlier version, whichever worker
(thread or process) registers when, and once the confirmation registered its answer no search trial supersedes
it. Real MLflow (a SQLite store), real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import copy_store

from study.tracking.registry import register_answer, register_search_best

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_template) -> tuple[MlflowClient, str, list[str]]:
    """A SQLite tracking store (a copy of the migrated template) with eight finished runs to register from; each
    test registers under its own model name."""
    root = tmp_path_factory.mktemp("registry")
    uri = copy_store(mlflow_template, root)
    client = MlflowClient(uri)
    experiment = client.create_experiment("reg", artifact_location=str(root / "artifacts"))
    runs = [client.create_run(experiment).info.run_id for _ in range(8)]
    return client, uri, runs


def _register(store, name: str, run_id: str, value: float, maximize: bool = True):
    client, uri, _ = store
    return register_search_best(client, uri, name, run_id, None, value, maximize,
                                {"optuna.study": "reg"})


def _values(client, name: str) -> list[float]:
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return [float(v.tags["distillstudy.value"]) for v in versions]


def test_a_late_worse_trial_is_not_registered(store):
    # Values in the order the workers' writers get to them: a late 0.7 after the 0.9 must not become `latest`.
    for run_id, value in zip(store[2], [0.5, 0.9, 0.7, 0.9, 0.95]):
        _register(store, "late-best", run_id, value)
    assert _values(store[0], "late-best") == [0.5, 0.9, 0.95]


def test_minimised_objectives_keep_the_smallest(store):
    for run_id, value in zip(store[2], [30.0, 12.0, 20.0]):
        _register(store, "min-best", run_id, value, maximize=False)
    assert _values(store[0], "min-best") == [30.0, 12.0]


def test_the_confirmed_answer_is_never_superseded_by_a_search_trial(store):
    client, uri, runs = store
    _register(store, "conf-best", runs[0], 0.6)
    version = register_answer(client, uri, "conf-best", runs[1], None, {})
    assert register_answer(client, uri, "conf-best", runs[1], None, {}) == version  # once
    assert _register(store, "conf-best", runs[2], 0.99) is None  # better on the search seed, but unconfirmed
    latest = max(client.search_model_versions("name='conf-best'"), key=lambda v: int(v.version))
    assert (latest.run_id, latest.tags["distillstudy.state"]) == (runs[1], "confirmed")


WORKER = """
import sys
from mlflow import MlflowClient
from study.tracking.registry import register_search_best
uri, run_ids, values = sys.argv[1], sys.argv[2].split(","), [float(v) for v in sys.argv[3].split(",")]
client = MlflowClient(uri)
for run_id, value in zip(run_ids, values):
    register_search_best(client, uri, "proc-best", run_id, None, value, True, {})
"""


@pytest.mark.slow
def test_workers_in_several_processes_only_ever_register_improvements(store):
    client, uri, runs = store
    plans = [(runs[0:4], [0.60, 0.90, 0.70, 0.95]), (runs[4:8], [0.85, 0.65, 0.80, 0.75])]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, ",".join(ids), ",".join(map(str, values))],
                              cwd=REPO) for ids, values in plans]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    values = _values(client, "proc-best")
    assert values == sorted(values) and len(set(values)) == len(values), values  # every version an improvement
    assert values[-1] == 0.95
