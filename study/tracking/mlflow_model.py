"""The delivered model as an MLflow PyTorch model, the form `mlflow.pytorch.load_model` reads.

The model is saved in MLflow's `pt2` format (`torch.export`): a traced graph of the forward pass with its weights,
batch dimension dynamic. Loading it needs torch and mlflow only -- not distillstudy, not the architecture's code
(so no `code_paths`), and no pickle: MLflow 3 refuses to unpickle models unless
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION` is set, and a pickled `GroupedModel` would need distillstudy importable.
`mlflow.pytorch.load_model(...)` returns a module mapping a float32 batch (N, C, H, W) in [0, 1] to (N, classes)
logits. It is exported in eval mode: BatchNorm uses its running statistics, as in every reported accuracy.

`torch.export` changes torch's process-wide state while it runs (oneDNN and cuDNN off, the global generator's
state put back at the end), so it runs under `models.seeding.exclusive_torch_state`: the worker's trial threads
pause for it (at their next training step), and no trial's result depends on when a best model was logged.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch

from models.seeding import exclusive_torch_state


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of `model` on the host in the default memory format (CUDA trials train channels_last)."""
    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()


@contextmanager
def global_tracking_uri(uri: str):
    """`mlflow.pytorch.log_model` has no tracking-URI argument: it logs through the process-wide tracking URI
    (which `mlflow.set_tracking_uri` also copies to $MLFLOW_TRACKING_URI). Point both at `uri` for the call and
    put both back, so that nothing else in the process (another study's tracker, a test) sees a changed default.
    Only the tracker's writer thread logs and registers models (and `study confirm` registers its answer once the
    workers stopped); every other MLflow call names its URI through `MlflowClient`."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as uri_state  # holds the URI set_tracking_uri sets

    old_uri, old_env = uri_state._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def log_pytorch_model(client, uri: str, experiment_id: str, run_id: str, model: torch.nn.Module,
                      example: torch.Tensor, params: dict) -> str:
    """Log `model` (from `cpu_copy`) as an MLflow PyTorch model of trial run `run_id`, with the signature inferred
    from `example` (a batch of real images) and its logits, and `example` as the input example. Returns the logged
    model's id (`models:/<id>`), which a registered version points to.

    The logged model is created here in the study's experiment, linked to the trial run as its output; left to
    itself, `log_model` would file it under the default experiment of the process."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import infer_signature

    example = example.detach().to("cpu", torch.float32).contiguous().numpy()
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id,
                                        params={k: str(v) for k, v in params.items()})
    with global_tracking_uri(uri), exclusive_torch_state():
        mlflow.pytorch.log_model(
            model, name="model", model_id=logged.model_id, serialization_format="pt2",
            signature=infer_signature(example, logits), input_example=example,
            # Stated, not inferred: inference loads the model in a subprocess (seconds per registered trial),
            # and the exported graph needs torch alone.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def register_version(client, uri: str, name: str, run_id: str, model_id: str | None, tags: dict):
    """A new version of registered model `name` (tracking URI `uri`): the logged model `model_id` of trial run
    `run_id`, or its weights folder when `model_id` is None (the model could not be exported).

    The source is `models:/<model_id>`, the form the UI links to the logged model's page. A database registry
    store (SQLite, PostgreSQL) resolves that source through the process-wide tracking URI, not `client`'s (MLflow
    3's sqlalchemy_store.create_model_version: "TODO: Propagate tracking URI"): left alone it looks in another
    store and fails with "Logged model with ID ... not found". So the call runs with `uri` as that URI. The
    logged model's `mlflow.modelVersions` tag (which `mlflow.register_model` also sets) lists the version on the
    model's page."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if model_id is None:
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    with global_tracking_uri(uri):
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                              model_id=model_id, tags=tags)
    # Each logged model is registered once: its list holds this version only.
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        [{"name": version.name, "version": str(version.version)}])})
    return version
