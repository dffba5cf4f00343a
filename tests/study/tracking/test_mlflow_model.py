"""The registered best model is an MLflow PyTorch model: a tiny finished study (SQLite Optuna, SQLite MLflow, in a
tmp folder), then `mlflow.pytorch.load_model("models:/<study>-best/latest")` in a new Python process, as a user
would, classifies a batch of any size into (N, num_classes) logits, equal to those of the registered run's
weights, without importing distillstudy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import TINY, options

import cli
from models import create_model
from study.tracking.mlflow_model import global_tracking_uri

REPO = Path(__file__).resolve().parents[3]
SETS = options([*TINY, "study.baselines=false", "study.pruner.name=none", "study.pruner.kwargs={}"])

LOAD = """
import sys, mlflow, numpy as np, torch
model = mlflow.pytorch.load_model("models:/tiny-best/latest")
batch = torch.from_numpy(np.load(sys.argv[1]))
with torch.no_grad():
    np.save(sys.argv[2], model(batch).numpy())
ours = {"models", "objectives", "study", "cli"} & {name.split(".")[0] for name in sys.modules}
assert not ours, f"loading imported distillstudy modules {ours}"
"""


@pytest.mark.slow  # a study with MLflow, then a fresh process loading the model
def test_registered_best_model_loads_in_a_new_process(tmp_path, monkeypatch, teacher_cache_dir, mlflow_sqlite):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_sqlite
    result = CliRunner().invoke(cli.main, [
        "study", "run", "tiny", "--config", str(REPO / "examples" / "quickstart.yaml"), "--n-trials", "1",
        "--storage", f"sqlite:///{tmp_path}/optuna.db", "--set", f"tracking.mlflow_uri={uri}",
        "--set", f"pipeline.cache_dir={teacher_cache_dir}", "--quiet", *SETS])
    assert result.exit_code == 0, result.output
    # Logging the model pointed MLflow's process-wide URI at the study's store for the call only.
    assert "MLFLOW_TRACKING_URI" not in os.environ

    client = mlflow.MlflowClient(uri)
    latest = max(client.search_model_versions("name='tiny-best'"), key=lambda v: int(v.version))
    assert latest.source.startswith("models:/m-")  # the logged MLflow model, not a folder of weights
    logged = client.get_logged_model(latest.source.removeprefix("models:/"))
    assert logged.source_run_id == latest.run_id
    assert logged.experiment_id == client.get_experiment_by_name("tiny").experiment_id
    with global_tracking_uri(uri):  # `models:/<id>` resolves through the process-wide URI, which other tests move
        signature = mlflow.models.get_model_info(latest.source).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    # The weights and the layer map stay artifacts of the trial's run.
    folder = client.download_artifacts(latest.run_id, "", str(tmp_path / "run"))
    layers = json.loads(Path(folder, "layer_map.json").read_text())
    reference = create_model(layers["arch"], layers["num_classes"], layers["in_channels"],
                             group_widths=layers["group_widths"])
    reference.load_state_dict(torch.load(Path(folder, "model", "state_dict.pt"), weights_only=True))

    batch = torch.rand(5, layers["in_channels"], 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "batch.npy", batch.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a user's process: no distillstudy on the path
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "batch.npy"), str(tmp_path / "logits.npy")],
                   cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri}, check=True, timeout=300)
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (5, layers["num_classes"])
    with torch.no_grad():
        assert np.allclose(logits, reference.eval()(batch).numpy(), atol=1e-5)
