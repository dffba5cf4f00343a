"""The MLflow side of a study's life, on real SQLite tracking stores (no server needed):

- 3 `study run` worker processes started at once on a fresh Optuna SQLite file and a fresh MLflow SQLite store
  all exit 0 with no traceback, and share one experiment and one parent run;
- `study create` initialises the tracking store, the experiment (model-training view, a description) and the
  parent run (SCHEDULED); the parent run is RUNNING while a worker runs, FINISHED once the study is at its total
  (`--n-trials` or `study.n_trials`), KILLED when a worker stops short of it with nothing left running, and
  carries `best_target_val_acc` stepped by finished trials;
- a filter on ``params.`layers.head` `` finds the trials (one name per layer parameter);
- MLflow's database-initialisation log lines (alembic) stay out of a worker's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from tiny import TINY

import cli
from study.workers.studies import load_study

REPO = Path(__file__).resolve().parents[3]
CLI = REPO / "cli.py"
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
# A trial of about a second on one core; three trials = the three baselines.
SETS = [*TINY, "study.n_trials=3"]
# What MLflow's store initialisation prints through alembic and its own logger on a fresh database.
INIT_LOG = ("alembic", "Context impl", "Running upgrade", "Creating initial MLflow database tables")


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILLSTUDY_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _runs(client, name: str, role: str):
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment '{name}'"
    return client.search_runs([exp.experiment_id], f"tags.`distillstudy.role` = '{role}'", max_results=1000)


@pytest.mark.slow  # three worker processes initialising fresh stores together
def test_three_workers_start_at_once_on_fresh_stores(tmp_path):
    optuna_url, mlflow_uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["study", "run", "first", "--config", QUICKSTART, "--storage", optuna_url, "--quiet",
            *_sets([*SETS, f"tracking.mlflow_uri={mlflow_uri}", f"pipeline.cache_dir={tmp_path}/cache"])]
    procs = [subprocess.Popen([sys.executable, str(CLI), *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and "Traceback" not in out + err, f"rc={p.returncode}\n{out}\n{err[-4000:]}"
        assert not any(s in out + err for s in INIT_LOG), err
    study, _ = load_study("first", optuna_url)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == 3
    client = _client(mlflow_uri)
    (parent,) = _runs(client, "first", "study")
    assert parent.info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert len(_runs(client, "first", "trial")) == 3
    assert len(_runs(client, "first", "teacher")) == 1


def _cli(args: list[str]):
    result = CliRunner().invoke(cli.main, args)
    assert "Traceback" not in result.output, result.output
    return result


def test_parent_run_lifecycle_view_and_best_metric(tmp_path, teacher_cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optuna_url, mlflow_uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    sets = _sets([*SETS, f"tracking.mlflow_uri={mlflow_uri}", f"pipeline.cache_dir={teacher_cache_dir}",
                  "study.n_trials=4"])
    result = _cli(["study", "create", QUICKSTART, "--name", "life", "--storage", optuna_url, *sets])
    assert result.exit_code == 0, result.output
    assert not any(s in result.output for s in INIT_LOG), result.output
    client = _client(mlflow_uri)
    exp = client.get_experiment_by_name("life")
    # MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, evaluations).
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "life" in exp.tags["mlflow.note.content"]
    (parent,) = _runs(client, "life", "study")
    assert parent.info.status == "SCHEDULED"  # created, no worker yet
    study, _ = load_study("life", optuna_url)
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id

    # `--n-trials` is the study's total for this run: at it, FINISHED.
    result = _cli(["study", "run", "life", "--storage", optuna_url, "--n-trials", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not any(s in result.output for s in INIT_LOG), result.output
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    # A worker stopped short of the total (its time is up before a trial starts), nothing running: KILLED.
    result = _cli(["study", "run", "life", "--storage", optuna_url, "--timeout", "0.001", "--quiet"])
    assert result.exit_code == 0, result.output
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    # Resumed to the study's total (4): FINISHED again.
    result = _cli(["study", "run", "life", "--storage", optuna_url, "--quiet"])
    assert result.exit_code == 0, result.output
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert len(_runs(client, "life", "study")) == 1

    study, _ = load_study("life", optuna_url)
    done = sorted((t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")), key=lambda t: t.number)
    assert len(done) == 4
    history = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "best_target_val_acc"))
    best, expected = None, []
    for i, t in enumerate(done, 1):
        if t.state.name == "COMPLETE":
            acc = t.user_attrs["stages"][t.user_attrs["best_stage"]]["target_val_acc"]
            best = acc if best is None else max(best, acc)
        if best is not None:
            expected.append((i, best))
    assert history == expected
    assert parent.data.metrics["best_target_val_acc"] == study.best_value

    # One name per layer parameter: MLflow's search filters on the Optuna parameter's name.
    head = study.best_trial.params["layers.head"]
    found = client.search_runs([parent.info.experiment_id], f"params.`layers.head` = '{head}'", max_results=100)
    want = {t.user_attrs["mlflow_run_id"] for t in study.trials if t.user_attrs.get("choices", {}).get(
        "layers.head") == head and t.user_attrs.get("mlflow_run_id")}
    assert want and {r.info.run_id for r in found} == want
    # Its confirmation nests in the same parent run and leaves the study's status alone (FINISHED, not KILLED or
    # RUNNING by the companion's own totals).
    result = _cli(["study", "confirm", "life", "--storage", optuna_url, "--top", "1", "--seeds", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert len(_runs(client, "life", "study")) == 1
