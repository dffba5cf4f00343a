"""What the study CLI commands do, as plain functions (the CLI only parses and prints)."""

from __future__ import annotations

import shlex
from pathlib import Path

import optuna

from models.errors import UserError
from study.config.allowed_imports import ATTR as ALLOWED
from study.config.config import load_config
from study.config.names import check_study_name
from study.output import format_best, format_confirmation, format_stage_lines, format_trial_line
from study.trials.record import TrialRecord
from study.workers.progress import TrialProgress, pipeline_lines
from study.workers.storage import mask_url, resolve_storage_url
from study.workers.studies import best_summary, create_study, load_study

# The embedded default study: `study run` with no NAME and no --config runs it.
QUICKSTART = Path(__file__).parent / "quickstart.yaml"  # examples/quickstart.yaml, packaged with `study`


def create(config_path: str, name: str | None, storage: str | None, overrides, load_if_exists: bool) -> str:
    """`study create`: validate, create, store the config, enqueue baselines. Returns the message to print."""
    config = load_config(config_path, overrides)
    name = config.study.name if name is None else name  # an explicit --name "" is an error, not the default
    url = resolve_storage_url(storage, config.study.storage)
    study, created = create_study(config, name, url, load_if_exists)
    _prepare_tracking(study, name, url, created)
    queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    verb = "created" if created else "loaded existing"
    allow = "".join(f" --allow-import {shlex.quote(p)}" for p in study.user_attrs.get(ALLOWED, []))
    return (f"{verb} study '{name}' in {mask_url(url)} ({queued} baseline trials queued)\n"
            f"run a worker: distillstudy study run {shlex.quote(name)} --storage {shlex.quote(mask_url(url))}{allow}")


def _prepare_tracking(study: optuna.Study, name: str, url: str, created: bool) -> None:
    # The tracking store, the experiment and the parent run exist before any worker starts, so workers started
    # together only find them. A store that cannot be used leaves no study behind.
    from study.config.config import config_from_dict
    from study.tracking import make_tracker
    from study.workers.studies import storage_for

    stored = config_from_dict(study.user_attrs["config"])  # the study's own config: storage masked, name set
    try:
        make_tracker(stored).prepare_study(study, stored)
    except UserError:
        if created:
            optuna.delete_study(study_name=name, storage=storage_for(url, create=False))
        raise


def _create_to_run(config, name: str, url: str, device: str | None) -> None:
    # `study run --config`: the study (and its baselines) exists only once this machine can run its trials and
    # track them: a worker that cannot (no data, no CUDA, an unreachable tracking server) leaves nothing behind.
    from study.workers.worker import preflight

    preflight(config.with_changes("pipeline", device=device) if device else config)
    study, created = create_study(config, name, url, load_if_exists=True)
    _prepare_tracking(study, name, url, created)


def run(name, config_path, storage, overrides, n_trials, timeout, n_jobs, device, quiet, verbose, echo) -> int:
    """`study run`: a worker; prints a line per finished trial and the winner at the end. Returns the exit code."""
    from study.workers.worker import run_worker

    if name is None and config_path is None:
        config_path = str(QUICKSTART)
    if config_path is not None:
        config = load_config(config_path, overrides)
        name = config.study.name if name is None else name  # an explicit --name "" is an error, not the default
        url = resolve_storage_url(storage, config.study.storage)
        _create_to_run(config, name, url, device)
    else:
        check_study_name(name)
        if overrides:
            raise UserError("--set changes a config: use it with --config (a stored study's config is fixed)")
        url = resolve_storage_url(storage)
    study, config = load_study(name, url, with_heartbeat=True)  # loaded once, passed down to the worker
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
        lines = [format_trial_line(trial)] + (format_stage_lines(trial) if verbose else [])
        done = len(study_.get_trials(deepcopy=False, states=finished_states))
        progress.finished(done, "\n".join(lines), best=_best_value(study_))

    try:
        with pipeline_lines(progress):
            run_worker(name, url, n_trials=total, timeout=timeout, n_jobs=n_jobs, device=device, on_trial=on_trial,
                       loaded=(study, config))
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
        echo(_closing(name, url, study, config))
    c = config.study.confirm
    if c.top > 0 and len(config.study.objective) == 1 and \
            len(study.get_trials(deepcopy=False, states=finished_states)) >= total:
        return confirm(name, url, c.top, c.seeds, n_jobs, device, quiet, echo, loaded=(study, config))
    return 0


def confirm(name: str, storage: str | None, top: int | None, seeds: int | None, n_jobs: int, device: str | None,
            quiet: bool, echo, loaded=None) -> int:
    """`study confirm` (and the end of `study run`, which passes the study and config it `loaded`): re-run the
    top configurations and the baselines on fresh seeds in the companion study `<name>-confirm`, then print the
    confirmation table and the verdict."""
    from study.confirm.confirmation import configurations_of, confirm_name, prepare, summarize
    from study.workers.worker import run_worker

    url = resolve_storage_url(storage)
    check_study_name(name)
    study, config = loaded or load_study(name, url)
    top, seeds = top or config.study.confirm.top or 3, seeds or config.study.confirm.seeds
    companion, total = prepare(study, config, url, top, seeds)
    if not quiet:
        tops, bases = configurations_of(companion)
        fewer = f" (of the top {top} asked for; the others are not distinct)" if tops < top else ""
        resample = companion.user_attrs.get("confirm_resample", "none")
        what = "each seed with its own data split and teacher" if resample == "splits" else \
            "every seed on the study's data split and teacher"
        echo(f"confirming on fresh seeds: {total} runs in study '{companion.study_name}': {tops} distinct "
             f"configurations{fewer} and {bases} baselines, {total // max(tops + bases, 1)} seeds each; "
             f"resample: {resample}, {what}")

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what the worker counts
    # The confirmation is most of a demo's time: the same bar as the search's, over the companion's runs.
    progress = None if quiet else TrialProgress(total, len(companion.get_trials(deepcopy=False, states=finished)),
                                                echo)

    def on_trial(study_, trial):
        if progress is not None and trial.state != optuna.trial.TrialState.WAITING:
            r = TrialRecord(trial)
            done = len(study_.get_trials(deepcopy=False, states=finished))
            progress.finished(done, f"{r.confirm_role or '?':<16} seed {r.seed}: {format_trial_line(trial)}")

    try:
        with pipeline_lines(progress):
            run_worker(confirm_name(name), url, n_trials=total, n_jobs=n_jobs, device=device, on_trial=on_trial)
    except KeyboardInterrupt:
        echo("interrupted: rerun `distillstudy study confirm` to finish the confirmation")
        return 130
    finally:
        if progress is not None:
            progress.close()
    summary = summarize(companion)
    published = _publish_answer(study, config, summary)
    if not quiet:  # the verdict stays the last line
        echo((f"{published}\n" if published else "") + format_confirmation(summary))
    return 0


def _publish_answer(study: optuna.Study, config, summary: dict) -> str | None:
    """The confirmed answer onto the parent MLflow run and into the registry (nothing without tracking or before
    every confirmation run finished). Returns the line to print."""
    from study.confirm.confirmation import answer, registration_seed

    chosen = answer(summary)
    if chosen is None or not config.tracking.enabled:
        return None
    from study.tracking.answer import publish

    try:
        return publish(study, config, summary, chosen, registration_seed(config))
    except Exception as exc:  # noqa: BLE001 - the verdict stands in the Optuna storage; say why MLflow lacks it
        return f"warning: the answer was not published to MLflow ({type(exc).__name__}: {str(exc)[:200]})"


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except (ValueError, RuntimeError):  # nothing complete yet, or a multi-objective study
        return None


def _closing(name: str, url: str, study: optuna.Study, config) -> str:
    lines = []
    counts = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    lines.append(", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n))
    try:
        lines.append(format_best(best_summary(name, url, loaded=(study, config))))
    except UserError as exc:
        lines.append(str(exc))
    from study.tracking import tracking_uri
    from study.tracking.view import experiment_url
    from study.ui import runnable

    uri = tracking_uri(config)
    if config.tracking.enabled and uri.startswith("http"):
        link = experiment_url(mask_url(uri), study.user_attrs.get("mlflow_experiment_id"))
        lines.append(f"browse the trials: open {link}")
    elif config.tracking.enabled:
        # Printed runnable as they stand (the virtual environment is usually not active in the user's shell), with
        # the link that opens MLflow 3's UI on the runs table rather than its GenAI view.
        link = experiment_url("http://127.0.0.1:5000", study.user_attrs.get("mlflow_experiment_id"))
        lines.append(f"browse the trials: {runnable('mlflow')} ui --backend-store-uri {shlex.quote(mask_url(uri))}"
                     f"   then open {link}")
        if _is_quickstart_tracking(config, name):  # `distillstudy ui` reads the quickstart's config
            lines.append(f"               or: {runnable('distillstudy')} ui   (prints the link once the UI answers)")
    # optuna-dashboard takes a journal file as a plain path.
    lines.append(f"optuna dashboard:  {runnable('optuna-dashboard')} "
                 f"{shlex.quote(mask_url(url).removeprefix('journal:'))}")
    return "\n".join(lines)


def _is_quickstart_tracking(config, name: str) -> bool:
    """Whether `distillstudy ui` without --config (the quickstart's tracking URI and experiment) shows this study."""
    from study.tracking import tracking_uri

    default = load_config(str(QUICKSTART))
    return (tracking_uri(config), config.tracking.experiment or name) == \
        (tracking_uri(default), default.tracking.experiment or default.study.name)


def export(name: str, storage: str | None, fmt: str, out: str | None) -> str | None:
    """`study export`: the trials as CSV/JSON text, returned (to print) or written to `out`, whose missing parent
    folders are created (as `study report --out` does). Nothing is written when the study cannot be read."""
    from study.workers.studies import export_trials

    text = export_trials(name, resolve_storage_url(storage), fmt)
    if out is None:
        return text
    path = Path(out).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write '{out}': {exc.strerror or exc}") from None
    return None


def replay(name: str, number: int, storage: str | None, device: str | None = None):
    """Rerun a stored trial's pipeline with its stored choices and seed (on `device`, else the stored config's
    pipeline.device). Returns a `study.trials.replay.Replayed`: the result beside what the trial stored, compared."""
    from objectives.pipeline import run_trial
    from study.trials.replay import Replayed

    check_study_name(name)
    study, config = load_study(name, resolve_storage_url(storage))
    trials = [TrialRecord(t) for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials or not trials[0].get("choices"):
        raise UserError(f"study '{name}' has no trial {number} with stored choices")
    r = trials[0]
    if device:
        config = config.with_changes("pipeline", device=device)
    curve: dict[int, float] = {}
    # The stored seeds: the trial's run seed (a confirmation run's fresh one) and data seed (its split and teacher:
    # the study's, or a resampled confirmation run's own).
    result = run_trial(config.task, config.model, config.pipeline, r.trial_choices(), run_seed=r.seed,
                       data_seed=r.data_seed, report=lambda step, value, _stage: curve.__setitem__(step, value))
    pruned = r.state == optuna.trial.TrialState.PRUNED
    # What to compare the replay's value (target val acc) with: the trial's value when that is its objective.
    stored = r.values[0] if r.values and (pruned or config.study.objective == ["target_val_acc"]) else \
        r.delivered["target_val_acc"]
    return Replayed(result, stored, stored_hash=None if pruned else r.model_hash,
                    stored_curve=dict(r.trial.intermediate_values), curve=curve, pruned=pruned)


def run_fixed_trial(config, on_epoch=None):
    """`trial run`: the pipeline once with the config's default choices (pins, range defaults, first list
    elements), no Optuna study."""
    from objectives.pipeline import run_trial

    with pipeline_lines(None):  # its warnings (a corrupt cache entry, a teacher near chance) on stderr
        return run_trial(config.task, config.model, config.pipeline, config.search.defaults(), on_epoch=on_epoch)


def start_ui(config_path: str, port: int, storage: str | None, echo, host: str = "127.0.0.1",
             workers: int = 1) -> int:
    """`distillstudy ui`: the MLflow UI bound to `host` on the config's tracking URI (see `ui.start_ui`)."""
    from study.tracking import tracking_uri
    from study.ui import start_ui as run_ui

    config = load_config(config_path)
    url = resolve_storage_url(storage, config.study.storage)
    return run_ui(tracking_uri(config), config.tracking.experiment or config.study.name, host, port,
                  shlex.quote(mask_url(url).removeprefix("journal:")), echo, workers)
