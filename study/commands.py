"""What the study CLI commands do, as plain functions (the CLI only parses and prints)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna

from models.errors import UserError

from .config import load_config
from .progress import TrialProgress
from .objective import choices_from_attrs
from .storage import mask_url, resolve_storage_url
from .studies import best_summary, create_study, load_study

# The embedded default study: `study run` with no NAME and no --config runs it.
QUICKSTART = Path(__file__).parent / "quickstart.yaml"  # examples/quickstart.yaml, packaged with `study`
_SHORT = {"finetune": "ft", "freeze": "fr", "replace": "rp"}


def create(config_path: str, name: str | None, storage: str | None, overrides, load_if_exists: bool) -> str:
    """`study create`: validate, create, store the config, enqueue baselines. Returns the message to print."""
    config = load_config(config_path, overrides)
    name = name or config.study.name
    url = resolve_storage_url(storage, config.study.storage)
    study, created = create_study(config, name, url, load_if_exists)
    queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    verb = "created" if created else "loaded existing"
    return (f"{verb} study '{name}' in {mask_url(url)} ({queued} baseline trials queued)\n"
            f"run a worker: distillstudy study run {name} --storage '{mask_url(url)}'")


def run(name, config_path, storage, overrides, n_trials, timeout, n_jobs, device, quiet, verbose, echo) -> int:
    """`study run`: a worker; prints a line per finished trial and the winner at the end. Returns the exit code."""
    from .worker import run_worker

    if name is None and config_path is None:
        config_path = str(QUICKSTART)
    if config_path is not None:
        config = load_config(config_path, overrides)
        name = name or config.study.name
        url = resolve_storage_url(storage, config.study.storage)
        create_study(config, name, url, load_if_exists=True)
    else:
        if overrides:
            raise UserError("--set changes a config: use it with --config (a stored study's config is fixed)")
        url = resolve_storage_url(storage)
    study, config = load_study(name, url)
    total = n_trials or config.study.n_trials
    if not quiet:
        echo(f"study '{name}' in {mask_url(url)}: running to {total} finished trials "
             f"({config.task.name}, {config.model.arch}, sampler {config.study.sampler.name}, "
             f"pruner {config.study.pruner.name})")

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    progress = None if quiet else TrialProgress(total, len(study.get_trials(deepcopy=False, states=finished_states)),
                                                echo)

    def on_trial(study_, trial):
        if progress is None:
            return
        lines = [format_trial_line(trial)]
        if verbose and trial.user_attrs.get("stages"):
            lines += [f"        {stage:<10} source val {acc['source_val_acc']:.3f}  target val "
                      f"{acc['target_val_acc']:.3f}  epochs {acc['epochs']}"
                      for stage, acc in trial.user_attrs["stages"].items()]
        done = len(study_.get_trials(deepcopy=False, states=finished_states))
        progress.finished(done, "\n".join(lines), best=_best_value(study_))

    try:
        run_worker(name, url, n_trials=total, timeout=timeout, n_jobs=n_jobs, device=device, on_trial=on_trial)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if progress is not None:
            progress.close()
    if interrupted:
        echo("interrupted: the running trial is marked FAIL and queued again; rerun the same command to continue")
        return 130
    if not quiet:
        echo(_closing(name, url, config))
    c = config.study.confirm
    if c.top > 0 and len(config.study.objective) == 1 and \
            len(study.get_trials(deepcopy=False, states=finished_states)) >= total:
        return confirm(name, url, c.top, c.seeds, n_jobs, device, quiet, echo)
    return 0


def confirm(name: str, storage: str | None, top: int | None, seeds: int | None, n_jobs: int, device: str | None,
            quiet: bool, echo) -> int:
    """`study confirm` (and the end of `study run`): re-run the top configurations and the baselines on fresh
    seeds in the companion study `<name>-confirm`, then print the confirmation table and the verdict."""
    from .confirm import confirm_name, prepare, summarize
    from .worker import run_worker

    url = resolve_storage_url(storage)
    study, config = load_study(name, url)
    top, seeds = top or config.study.confirm.top or 3, seeds or config.study.confirm.seeds
    companion, total = prepare(study, config, url, top, seeds)
    if not quiet:
        echo(f"confirming on fresh seeds: {total} runs in study '{companion.study_name}' (the top {top} distinct "
             f"configurations and the baselines, {seeds} seeds each)")

    def on_trial(_study, trial):
        if not quiet and trial.state != optuna.trial.TrialState.WAITING:
            a = trial.user_attrs
            echo(f"  {a.get('confirm_role', '?'):<16} seed {a.get('seed')}: {format_trial_line(trial)}")

    try:
        run_worker(confirm_name(name), url, n_trials=total, n_jobs=n_jobs, device=device, on_trial=on_trial)
    except KeyboardInterrupt:
        echo("interrupted: rerun `distillstudy study confirm` to finish the confirmation")
        return 130
    if not quiet:
        echo(format_confirmation(summarize(companion)))
    return 0


def format_confirmation(summary: dict) -> str:
    """The confirmation table (mean target test accuracy with its 95% interval over seeds) and the verdict."""
    lines = [f"confirmation ({summary['study']}):",
             f"  {'configuration':<16}{'trial':>6}{'seeds':>6}  {'target test (95% CI)':<28}{'target val':>10}"]
    for c in summary["configs"]:
        ci = c["target_test_ci"]
        test = f"{c['target_test_mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        lines.append(f"  {c['role']:<16}{c['trial']:>6}{len(c['seeds']):>6}  {test:<28}{c['target_val_mean']:>10.4f}")
    verdict = summary["verdict"]
    lines.append(f"verdict: {verdict['text']}" if verdict else "verdict: too few confirmation runs completed")
    return "\n".join(lines)


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except (ValueError, RuntimeError):  # nothing complete yet, or a multi-objective study
        return None


def format_trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """`trial   7 COMPLETE 0.8613 stem=ft block1=fr ... alpha=0.42 T=3.1 lr=0.0021  3.2s`."""
    attrs = trial.user_attrs
    value = "/".join(f"{v:.4f}" for v in trial.values) if trial.values else "-"
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        last = max(trial.intermediate_values)
        value = f"{trial.intermediate_values[last]:.4f}@{last}"
    choices = attrs.get("choices", {})
    layers = " ".join(f"{k.rsplit('.', 1)[1]}={_SHORT.get(v, v)}" for k, v in choices.items()
                      if k.startswith("search.layers."))
    shown = [("search.alpha", "alpha"), ("search.lr", "lr")]
    if choices.get("search.alpha"):  # the temperature only matters with a KD term
        shown.insert(1, ("search.temperature", "T"))
    extra = " ".join(f"{short}={choices[key]:.3g}" for key, short in shown if key in choices)
    if choices.get("search.recipe", "distill") != "distill" and not attrs.get("baseline"):
        extra = f"recipe={choices['search.recipe']} {extra}"
    tag = f" [{attrs['baseline']}]" if attrs.get("baseline") else ""
    why = f"  ({attrs['failure']})" if attrs.get("failure") else ""
    seconds = f"{attrs['seconds']:.1f}s" if attrs.get("seconds") is not None else ""
    return f"trial {trial.number:>3} {trial.state.name:<8} {value:<10} {layers} {extra} {seconds}{tag}{why}"


def _closing(name: str, url: str, config) -> str:
    lines = []
    study, _ = load_study(name, url)
    counts = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    lines.append(", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n))
    try:
        lines.append(format_best(best_summary(name, url)))
    except UserError as exc:
        lines.append(str(exc))
    from .mlflow_tracking import tracking_uri

    uri = tracking_uri(config)
    if config.tracking.enabled and uri.startswith("http"):
        lines.append(f"browse the trials: open {mask_url(uri)} (experiment '{config.tracking.experiment or name}')")
    elif config.tracking.enabled:
        lines.append(f"browse the trials: mlflow ui --backend-store-uri {mask_url(uri)}   (or: distillstudy ui)")
    # optuna-dashboard takes a journal file as a plain path.
    lines.append(f"optuna dashboard:  optuna-dashboard {mask_url(url).removeprefix('journal:')}")
    return "\n".join(lines)


def format_list(rows: list[dict]) -> str:
    if not rows:
        return "no studies"
    out = [f"{'study':<24}{'complete':>9}{'pruned':>8}{'fail':>6}{'running':>9}{'waiting':>9}  best"]
    for r in rows:
        out.append(f"{r['name']:<24}{r['COMPLETE']:>9}{r['PRUNED']:>8}{r['FAIL']:>6}{r['RUNNING']:>9}"
                   f"{r['WAITING']:>9}  {r['best']}")
    return "\n".join(out)


def format_status(data: dict) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in data["counts"].items() if n) or "no trials"
    lines = [f"study '{data['name']}': {counts}", f"best so far: {data['best']}"]
    for r in data["running"]:
        lines.append(f"  running trial {r['number']} for {r['age_s']} s")
    return "\n".join(lines)


def format_best(data: dict) -> str:
    """The winner's layer actions and hyperparameters with its accuracies, the baselines beside it."""
    def describe(row: dict, label: str) -> list[str]:
        layers = ", ".join(f"{k.split('.', 2)[2]}={v}" for k, v in row.items() if k.startswith("choice.layers."))
        hyper = ", ".join(f"{k.split('.', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                          for k, v in row.items() if k.startswith("choice.") and not k.startswith("choice.layers."))
        stage = row.get("best_stage", "")
        acc = {k: row.get(f"{stage}.{k}") for k in ("source_val_acc", "target_val_acc", "target_test_acc")}
        accs = "  ".join(f"{k} {v:.4f}" for k, v in acc.items() if v is not None)
        return [f"{label} trial {row['number']} (delivers stage {stage}): {accs}",
                f"    layers: {layers}", f"    {hyper}", f"    student params {row.get('student_params')}, "
                f"epochs to threshold {row.get('epochs_to_threshold')}"]

    lines = []
    if "best" in data:
        lines += describe(data["best"], "winner:  ")
    else:
        lines.append(f"Pareto front ({', '.join(data['objective'])}):")
        for row in data["pareto_front"]:
            lines += describe(row, f"  values {row['values']}")
    for row in data["baselines"]:
        lines += describe(row, f"baseline {row['baseline']}:")[:1]
    return "\n".join(lines)


def replay(name: str, number: int, storage: str | None):
    """Rerun a stored trial's pipeline with its stored choices and seed. Returns (result, stored value)."""
    from objectives.pipeline import run_trial

    study, config = load_study(name, resolve_storage_url(storage))
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials or "choices" not in trials[0].user_attrs:
        raise UserError(f"study '{name}' has no trial {number} with stored choices")
    t = trials[0]
    # The stored seed is the trial's run seed (a confirmation run's fresh one); splits and teacher stay the study's.
    result = run_trial(config.task, config.model, config.pipeline, choices_from_attrs(t.user_attrs),
                       run_seed=t.user_attrs.get("seed"))
    stored = t.values[0] if t.values else None
    if stored is not None and len(config.study.objective) == 1 and config.study.objective[0] != "target_val_acc":
        stored = t.user_attrs.get("stages", {}).get(t.user_attrs.get("best_stage"), {}).get("target_val_acc")
    return result, stored


def start_ui(config_path: str, port: int, storage: str | None, echo) -> int:
    """Start `mlflow ui` bound to 127.0.0.1 on the config's tracking URI; print the URL and the dashboard command."""
    from .mlflow_tracking import tracking_uri

    config = load_config(config_path)
    uri = tracking_uri(config)
    url = resolve_storage_url(storage, config.study.storage)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    echo(f"MLflow UI: http://127.0.0.1:{port}  (tracking URI {mask_url(uri)}; Ctrl-C to stop)")
    echo(f"Optuna dashboard: optuna-dashboard {mask_url(url)}")
    try:
        return subprocess.call([mlflow, "ui", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", uri])
    except KeyboardInterrupt:
        return 0
