"""The view of a study's experiment that a new user lands on in the MLflow UI: the runs table, sorted by the study's
value, with the columns that answer the study's question (value, target val/test accuracy, the layer actions).

MLflow 3's UI (3.17) shows only run name and date columns on a first visit, and opens in its GenAI view unless
the link says `workflowType=machine_learning`. A link may name a *shared view*: the experiment tag
`mlflow.sharedViewState.<key>` holds the view as JSON (search facets such as `orderByKey`, and the table's
`selectedColumns`, each column `metrics.`<name>`` or `params.`<name>``), applied when the page is opened with
`?viewStateShareKey=<key>`. The UI then says it shows a shared view, which the user may keep or leave.
"""

from __future__ import annotations

import json

from objectives.params import layer_param

SHARE_KEY = "distillstudy"
SHARED_VIEW_TAG = f"mlflow.sharedViewState.{SHARE_KEY}"
# Opens MLflow 3's model-training view (runs, metrics, models) whatever the browser last chose.
ML_VIEW = "workflowType=machine_learning"
METRIC_COLUMNS = ("value", "target_val_acc", "target_test_acc", "source_val_acc")


def column(kind: str, name: str) -> str:
    """A runs-table column key as MLflow's UI writes it (`metrics.`value``)."""
    return f"{kind}.`{name}`"


def shared_view(config) -> str:
    """The shared view's JSON for a study with `config`: sorted by `value` in the objective's direction, showing
    the metric columns above and every layer-action and KD parameter the search samples."""
    from study.config.config import OBJECTIVES

    params = [layer_param(g) for g in config.search.groups] + ["alpha", "temperature"]
    direction = OBJECTIVES.get(config.study.objective[0], "maximize")
    columns = [column("metrics", m) for m in METRIC_COLUMNS] + [column("params", p) for p in params]
    return json.dumps({
        "orderByKey": column("metrics", "value"),
        "orderByAsc": direction == "minimize",
        "selectedColumns": columns,
        "columnOrder": columns,  # value first (the UI would sort them by name)
    })


def experiment_url(base: str, experiment_id: str | None, with_view: bool = True) -> str:
    """The UI address that lands on experiment `experiment_id`'s runs table, in the shared view when `with_view`
    (only when the experiment has its tag: for a missing one the UI shows an error and falls back to the GenAI
    view); the experiment list, in the model-training view, without an id."""
    if not experiment_id:
        return f"{base.rstrip('/')}/#/experiments?{ML_VIEW}"
    view = f"&viewStateShareKey={SHARE_KEY}" if with_view else ""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{ML_VIEW}{view}"
