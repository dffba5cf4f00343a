"""The best model is registered on every kind of MLflow store: a SQLite file, a PostgreSQL database (a fresh one per
test, dropped after it) and an `mlflow server` process. A tiny `study run` on each, then
`mlflow.pytorch.load_model("models:/<study>-best/latest")` classifies a batch, the version links to its logged
model, and every run of the study is FINISHED (a trial COMPLETE in Optuna never stays RUNNING in MLflow).

The process-wide MLflow tracking URI ($MLFLOW_TRACKING_URI, a session store set by conftest.py) differs from the
study's on purpose: a database registry store resolves `models:/<id>` through it, which is how registration broke
("Logged model with ID ... not found") on PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow_server import mlflow_server
from pg_server import fresh_postgres_database

import cli
from study.tracking.mlflow_model import global_tracking_uri

REPO = Path(__file__).resolve().parents[3]
TINY = ["pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1",
        "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1", "task.max_per_domain=300", "study.baselines=false",
        "study.confirm.top=0", "study.pruner.name=none", "study.pruner.kwargs={}"]


@pytest.fixture(params=["sqlite", "postgresql", "server"])
def mlflow_store(request, tmp_path, mlflow_template):
    """The tracking URI of a new, empty MLflow store of the parametrized kind (SQLite ones copied from the migrated
    template: their creation is not what this is about)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("mlflow_sqlite")
    elif request.param == "postgresql":
        with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
            yield url
    else:
        root = tmp_path / "server"
        root.mkdir()
        with mlflow_server(root, template=mlflow_template) as (url, _proc):
            yield url


@pytest.mark.slow
def test_best_model_is_registered_and_every_run_finishes(mlflow_store, tmp_path, monkeypatch, teacher_cache_dir):
    monkeypatch.chdir(tmp_path)
    study = f"reg-{uuid.uuid4().hex[:8]}"
    sets = [a for v in [*TINY, f"tracking.mlflow_uri={mlflow_store}", f"pipeline.cache_dir={teacher_cache_dir}"]
            for a in ("--set", v)]
    result = CliRunner().invoke(cli.main, [
        "study", "run", study, "--config", str(REPO / "examples" / "quickstart.yaml"), "--n-trials", "1",
        "--storage", f"sqlite:///{tmp_path}/optuna.db", "--quiet", *sets])
    assert result.exit_code == 0, result.output

    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert {r.info.run_name: r.info.status for r in runs if r.info.status != "FINISHED"} == {}
    assert "warning: tracking call failed" not in result.output, result.output
    assert "closes without its artifacts" not in result.output, result.output
    assert {r.data.tags["distillstudy.role"] for r in runs} == {"study", "trial", "teacher"}

    (version,) = client.search_model_versions(f"name='{study}-best'")
    model_id = version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)  # the version's source is the logged model, in this store
    assert (logged.source_run_id, logged.experiment_id) == (version.run_id, experiment.experiment_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": f"{study}-best", "version": "1"}]

    with global_tracking_uri(mlflow_store):  # load_model, as a user would, reads the process-wide URI
        model = mlflow.pytorch.load_model(f"models:/{study}-best/latest")
    with torch.no_grad():
        logits = model(torch.rand(3, 1, 8, 8))
    assert logits.shape == (3, 10)
