"""`study report` and `study compare`: what a study found, as numbers (JSON), tables (Markdown) or one
self-contained HTML page with plots.

A report reads a snapshot of the study's trials, so it works while workers are still running (RUNNING and WAITING
trials are counted, not analysed), and on studies with pruned and failed trials. Below two completed trials it
says so and leaves out importances and plots. The statistics are in `stats` (bootstrap: see there), the plots in
`plots`, HTML and Markdown in `render`.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState

from models.errors import UserError, first_line
from study.config.names import check_study_name
from study.report.stats import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    MIN_INTERVAL_TRIALS,
    choice_effects,
    effective_study,
    group_effects,
    importances,
    target_val_acc,
)
from study.space.baselines import BASELINES
from study.space.search import applicable_choices
from study.trials.record import TrialRecord
from study.workers.storage import mask_url
from study.workers.studies import load_study

FORMATS = ("html", "md", "json")
FEW_TRIALS = "fewer than two completed trials"


def trial_summary(t: optuna.trial.FrozenTrial, objective: list[str]) -> dict:
    """A trial's layer action per group, hyperparameters, accuracies (of its delivered model), size and speed."""
    r = TrialRecord(t)
    return {"number": t.number, "state": t.state.name, "baseline": r.baseline, "values": t.values,
            "layers": r.layers, "hyperparameters": r.hyperparameters, "best_stage": r.best_stage, **r.delivered,
            "delivered": r.delivered_note,
            "target_val_acc": target_val_acc(t, objective), "student_params": r.get("student_params"),
            "epochs_to_threshold": r.get("epochs_to_threshold"), "seconds": r.get("seconds")}


def _finite_values(t) -> bool:
    return bool(t.values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in t.values)


def _best_single(complete, direction) -> optuna.trial.FrozenTrial | None:
    ranked = [t for t in complete if _finite_values(t)]
    if not ranked:
        return None
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(ranked, key=lambda t: t.values[0])  # ties: the earliest trial, as Optuna's best_trial


def build_report(name: str, url: str):
    """The report's numbers (JSON-able) and what the plots and logging need: (data, study, config, trials,
    effective study)."""
    study, config = load_study(name, url)
    trials = study.get_trials(deepcopy=False)  # one snapshot: workers may add trials while we read
    objective = list(config.study.objective)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    data = {"study": name, "storage": mask_url(url), "task": config.task.name, "arch": config.model.arch,
            "objective": objective, "directions": [d.name.lower() for d in study.directions],
            "generated": datetime.now().isoformat(timespec="seconds"), "counts": counts, "notes": []}
    notes = data["notes"]
    if counts["RUNNING"] or counts["WAITING"]:
        notes.append(f"{counts['RUNNING']} running and {counts['WAITING']} waiting trials: the report covers the "
                     f"{len(trials) - counts['RUNNING'] - counts['WAITING']} finished so far")
    if len(complete) < 2:
        notes.append(f"{FEW_TRIALS} ({len(complete)}): importances and plots need at least two")
    data["confirmation"] = confirmation(name, url)
    data.update(winners(study, trials, objective, data["confirmation"]))
    data["baseline_recipes"] = dict(BASELINES)
    data["groups"] = group_effects(trials, config.search.groups, objective)
    # Every other searched set of choices (the layer term, the recipe, ...) gets the same table.
    searched = [n for n, p in config.search.params.items() if p.mode == "categorical" and len(p.choices) > 1]
    data["choices"] = choice_effects(trials, searched, objective,
                                     lambda flat: applicable_choices(config.search, config.pipeline.replace_with, flat))
    data["bootstrap"] = {"method": "percentile bootstrap of the mean", "resamples": BOOTSTRAP_RESAMPLES,
                         "seed": BOOTSTRAP_SEED, "level": BOOTSTRAP_LEVEL, "min_trials": MIN_INTERVAL_TRIALS,
                         "value": "target val acc of completed trials (delivered model)"}
    effective = effective_study(study, trials) if len(complete) >= 2 else None
    data["importance"] = (importances(effective, objective) if effective
                          else {"skipped": f"{FEW_TRIALS} ({len(complete)})"})
    if "skipped" in data["importance"] and len(complete) >= 2:
        notes.append(f"importances skipped: {data['importance']['skipped']}")
    elif data["importance"].get("dropped_trials"):
        notes.append(f"importances leave out {data['importance']['dropped_trials']} completed trials (a choice "
                     f"outside its parameter's distribution, or no finite value)")
    data["plots"] = {}
    return data, study, config, trials, effective[0] if effective else None


def confirmation(name: str, url: str) -> dict | None:
    """The confirmation table and verdict of study `name`'s companion `<name>-confirm` (None when it has none)."""
    from study.confirm.confirmation import load_summary

    return load_summary(name, url)


def write_report(name: str, url: str, fmt: str = "html", out: str | None = None) -> list[str]:
    """Write the report (report.html + PNGs, report.md + PNGs, or report.json) to `out` (default
    reports/<study>/), log it to the study's parent MLflow run when tracking is on. Returns the lines to print."""
    check_study_name(name)  # the name becomes the default folder: never '../..'
    data, study, config, trials, effective = build_report(name, url)
    out_dir = Path(out) if out else Path("reports") / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, read-only, ...: one line, nothing written
        raise UserError(f"cannot create the report folder '{out_dir}': {exc.strerror or exc}") from None
    written, figures = [], {}
    lines = [n for n in data["notes"] if n.startswith(FEW_TRIALS)]
    if fmt in ("html", "md") and data["counts"]["COMPLETE"] >= 2:
        from study.report.plots import plots, write_png

        for plot in plots(study, trials, data, effective):
            try:
                png = out_dir / f"{plot.key}.png"
                write_png(plot, png)
                figures[plot.key] = plot.plotly() if fmt == "html" else None
            except Exception as exc:  # noqa: BLE001 - one plot failing (odd data) must not lose the report
                data["notes"].append(f"plot '{plot.key}' skipped: {type(exc).__name__}: {exc}"[:300])
                continue
            data["plots"][plot.key] = {"title": plot.title, "png": png.name}
            written.append(png)
    path = out_dir / f"report.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data, indent=2, default=str))
    else:
        from study.report.render import render_html, render_md

        path.write_text(render_html(data, figures) if fmt == "html" else render_md(data))
    written.insert(0, path)
    lines += [str(p) for p in written]
    logged = log_to_mlflow(study, config, written)
    if logged:
        lines.append(logged)
    return lines


def log_to_mlflow(study: optuna.Study, config, paths: list[Path]) -> str | None:
    """Log the written files as artifacts under `report/` of the study's parent MLflow run, when the stored config
    enables tracking and that run exists. Returns a line saying what happened (None when tracking is off)."""
    if not config.tracking.enabled:
        return None
    from study.tracking import tracking_uri

    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if not run_id:
        return "not logged to MLflow: the study has no parent run yet (no tracked worker has run)"
    uri = tracking_uri(config)
    local = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if local and not Path(local).exists():
        return f"not logged to MLflow: tracking store {mask_url(uri)} does not exist"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return f"not logged to MLflow: parent run {run_id} not found in {mask_url(uri)}"
    try:
        for p in paths:
            client.log_artifact(run_id, str(p), "report")
    except Exception as exc:  # noqa: BLE001 - the report is written either way; say why logging failed
        return f"MLflow logging failed: {type(exc).__name__}: {first_line(exc, 200)}"
    return f"logged {len(paths)} files to MLflow run {run_id} (artifacts report/)"


# ---- compare -----------------------------------------------------------------------------------------------------
def winners(study: optuna.Study, trials, objective: list[str], summary: dict | None = None) -> dict:
    """The winner (single objective: the confirmation's answer once confirmed (`summary`, from
    `confirm.load_summary`), else the best trial, unconfirmed; several: the Pareto-front trial with the best target
    val acc, beside the whole front), every baseline trial, and the best completed baseline (by target val acc)."""
    from study.confirm.confirmation import answer

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out = {"answer": None}
    if len(objective) > 1:
        front = {t.number for t in study.best_trials}
        out["pareto_front"] = [trial_summary(t, objective) for t in complete if t.number in front]
        out["winner"] = max(out["pareto_front"], key=lambda r: r["target_val_acc"] or -1.0, default=None)
        out["winner_rule"] = "the Pareto-front trial with the best target val acc"
    else:
        best = _best_single(complete, study.directions[0])
        out["winner"] = trial_summary(best, objective) if best else None
        out["winner_rule"] = f"the best {objective[0]}, unconfirmed (one seed, one validation split)"
        confirmed = answer(summary)
        if confirmed is not None:
            out["answer"] = {k: v for k, v in confirmed.items() if k != "confirmation"}
            out["search_best"] = out["winner"]
            source = next((t for t in trials if t.number == confirmed["trial"]), None)
            out["winner"] = trial_summary(source, objective) if source is not None else None
            out["winner_rule"] = (f"the confirmation's answer ({confirmed['role']}: "
                                  f"{confirmed['description']}), confirmed on fresh seeds")
    out["baselines"] = [trial_summary(t, objective) for t in trials if TrialRecord(t).baseline]
    done = [b for b in out["baselines"] if b["state"] == "COMPLETE" and b["target_val_acc"] is not None]
    out["best_baseline"] = max(done, key=lambda r: r["target_val_acc"], default=None)
    return out


def answer_words(chosen: dict | None) -> str:
    """`confirmed: use finetune-all` (or the configuration in words), or `unconfirmed`."""
    if not chosen:
        return "unconfirmed"
    return f"confirmed: use {chosen['role'] if chosen['kind'] == 'baseline' else chosen['description']}"


def compare_studies(names, url: str) -> dict:
    """One row per study: task, the winner's action per group, its target val acc and the best baseline's."""
    rows, groups = [], []
    for name in names:
        study, config = load_study(name, url)
        trials = study.get_trials(deepcopy=False)
        w = winners(study, trials, list(config.study.objective), confirmation(name, url))
        win, base = w["winner"], w["best_baseline"]
        chosen = w["answer"]
        groups += [g for g in config.search.groups if g not in groups]
        rows.append({"study": name, "task": config.task.name, "arch": config.model.arch,
                     "objective": list(config.study.objective),
                     "complete": sum(1 for t in trials if t.state == TrialState.COMPLETE),
                     "answer": answer_words(chosen),
                     "winner_trial": win["number"] if win else None, "layers": win["layers"] if win else {},
                     "winner_target_val_acc": win["target_val_acc"] if win else None,
                     "best_baseline": base["baseline"] if base else None,
                     "best_baseline_target_val_acc": base["target_val_acc"] if base else None})
    return {"groups": groups, "studies": rows,
            "winner_rule": "single objective: the confirmation's answer once `study confirm` ran, else the best "
                           "trial (unconfirmed); several: the Pareto-front trial with the best target val acc"}
