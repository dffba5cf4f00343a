"""Publishing a confirmed study's answer to MLflow: the parent run's tags and metrics say the verdict, and the
answer's confirmation run on the registration seed becomes the `confirmed` version of `<study>-best`.

Parent run tags: `distillstudy.answer_state` (`unconfirmed` from its creation, `confirmed` here),
`distillstudy.verdict` (the verdict line), `distillstudy.answer` (the configuration, in words),
`distillstudy.answer_role` (`top-1`, a baseline's name), `distillstudy.answer_trial` (the search trial it came
from), `distillstudy.resample`, `distillstudy.registered_run`; metrics per baseline `verdict/<baseline>/diff_mean`,
`.../ci_low`, `.../ci_high` (the winner minus the baseline, target test accuracy, paired by seed) and
`answer/target_test_mean` with its interval.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric, RunTag

from study.tracking import tracking_uri
from study.tracking.registry import register_answer


def publish(study, config, summary: dict, answer: dict, seed: int) -> str:
    """Tag the parent run with `answer` (from `confirm.answer(summary)`) and register its run on `seed`. Returns
    the line to print."""
    from mlflow import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    run_id = answer["confirmation"]["run_ids"].get(seed)
    if parent:
        _tag_parent(client, parent, summary, answer, run_id)
    if not config.tracking.register_best:
        return "the answer is not registered (tracking.register_best: false)"
    model_id = client.get_run(run_id).data.tags.get("distillstudy.model_id") if run_id else None
    if not run_id or (model_id is None and config.tracking.log_weights == "none"):
        return (f"the answer is not registered: its confirmation run on seed {seed} logged no model "
                f"(tracking.log_weights: {config.tracking.log_weights})")
    name = f"{study.study_name}-best"
    version = register_answer(client, uri, name, run_id, model_id,
                              {"optuna.study": study.study_name, "distillstudy.trial": str(answer["trial"]),
                               "distillstudy.answer_role": answer["role"], "distillstudy.seed": str(seed)})
    return f"registered the answer ({answer['role']}, seed {seed}) as models:/{name}/{version} (confirmed)"


def _tag_parent(client, parent: str, summary: dict, answer: dict, run_id: str | None) -> None:
    verdict, now = summary["verdict"], int(time.time() * 1000)
    tags = {"distillstudy.answer_state": "confirmed", "distillstudy.verdict": verdict["text"][:5000],
            "distillstudy.answer": answer["description"], "distillstudy.answer_role": answer["role"],
            "distillstudy.answer_trial": str(answer["trial"]), "distillstudy.resample": summary["resample"],
            "distillstudy.registered_run": run_id or ""}
    metrics = []
    for c in verdict["comparisons"]:
        if c["diff_mean"] is not None:
            metrics.append(Metric(f"verdict/{c['baseline']}/diff_mean", c["diff_mean"], now, 0))
        if c["diff_ci"]:
            metrics += [Metric(f"verdict/{c['baseline']}/ci_low", c["diff_ci"][0], now, 0),
                        Metric(f"verdict/{c['baseline']}/ci_high", c["diff_ci"][1], now, 0)]
    row = answer["confirmation"]
    metrics.append(Metric("answer/target_test_mean", row["target_test_mean"], now, 0))
    if row["target_test_ci"]:
        metrics += [Metric("answer/target_test_ci_low", row["target_test_ci"][0], now, 0),
                    Metric("answer/target_test_ci_high", row["target_test_ci"][1], now, 0)]
    client.log_batch(parent, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
