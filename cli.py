"""distillstudy's command line: a thin Click layer. Each command parses, calls one function, prints.

User errors (bad config, unknown names, missing data, unreachable storage) print one line and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from models.errors import UserError, mask_secrets


class _Group(click.Group):
    """Turns UserError, and a bad option or argument of a subcommand, into one line on stderr and exit code 2,
    never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # Click's own form is four lines (usage, a hint, a blank line, "Error: ..."); ours is the one line every
            # bad input gets, with where to look.
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see: {where} -h)", err=True)
            ctx.exit(2)
        except click.Abort:
            # A confirmation prompt answered no, or with no terminal to answer it: nothing was done. The newline ends
            # the prompt's line (as Click's own "Aborted!" does) when no answer came.
            click.echo("\nerror: not confirmed, nothing changed (answer y, or pass --yes)", err=True)
            ctx.exit(2)
        except UserError as exc:
            # Masked here too: no error line ever shows a password, whichever message quoted a URL.
            click.echo(f"error: {mask_secrets(str(exc))}", err=True)
            ctx.exit(2)
        except click.exceptions.Exit:
            raise  # a RuntimeError too: an inner group's exit, passed on without importing torch to look at it
        except RuntimeError as exc:
            from objectives.train import TrainingDiverged

            if not isinstance(exc, TrainingDiverged):
                raise
            # Not bad input but a failed run: one line, exit code 1.
            click.echo(f"trial failed: {exc}", err=True)
            ctx.exit(1)


def _show(data, as_json: bool, text) -> None:
    """Print `data` as JSON (`--json`) or as `text(data)` (a formatter of study.output)."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text(data))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _print_version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    from objectives.version import code_version

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    # The package version with the hash of the training code (the same string that tags MLflow runs and teacher
    # cache keys), and the libraries whose versions change results.
    click.echo(f"distillstudy {code_version()} (optuna {installed('optuna')}, mlflow {installed('mlflow')}, "
               f"torch {installed('torch')})")
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version (package + code hash) and the versions of Optuna, MLflow and torch.")
def main():
    """distillstudy: which layers to freeze, fine-tune or replace, and how to distill, found by an Optuna study."""
    from study.config.allowed_imports import grant

    grant()  # $DISTILLSTUDY_ALLOW_IMPORTS only; create, run and trial run add their --allow-import


def _grant(flags) -> None:
    from study.config.allowed_imports import grant

    grant(flags)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key, e.g. --set search.layers.head=finetune (repeatable).")
allow_import_option = click.option(
    "--allow-import", "allow", multiple=True, metavar="PKG",
    help="Let task.name / model.arch import modules of package PKG (package.module:function; repeatable; also "
         "$DISTILLSTUDY_ALLOW_IMPORTS=PKG,PKG2). A study records it; its workers need it too.")


# ---- trial -------------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def trial():
    """Run or replay a single pipeline."""


@trial.command("run")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML config (default: the quickstart, examples/quickstart.yaml).")
@set_option
@allow_import_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", is_flag=True, help="No per-epoch progress lines (on stderr); only the result.")
def trial_run(config_path, overrides, allow, as_json, quiet):
    """Run ONE pipeline with fixed choices (range defaults, first list elements, pins) and print per-stage accuracy."""
    _grant(allow)
    from study.commands import QUICKSTART, run_fixed_trial
    from study.config.config import load_config
    from study.output import format_epoch_line, format_trial

    def on_epoch(stage, step, metrics):
        click.echo(format_epoch_line(stage, step, metrics), err=True)  # stderr: stdout stays the result (--json)

    result = run_fixed_trial(load_config(config_path or str(QUICKSTART), overrides),
                             on_epoch=None if quiet else on_epoch)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_trial(result))


# ---- catalogs ----------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def tasks():
    """Built-in and torchvision-backed tasks."""


@main.group(cls=_Group)
def models():
    """Architectures and their layer groups."""


def _catalog_list(group, view: str, text: str, doc: str):
    """`GROUP list [--json]`: prints `study.catalog.<view>()` as JSON or through `study.output.<text>`."""

    @group.command("list", help=doc)
    @json_option
    def show(as_json):
        from study import catalog, output

        _show(getattr(catalog, view)(), as_json, getattr(output, text))

    return show


tasks_list = _catalog_list(tasks, "tasks_catalog", "format_tasks",
                           "List tasks with shift type, sizes and image shape (sizes for the offline tasks).")
models_list = _catalog_list(models, "models_catalog", "format_models", "List architectures with their layer groups.")


@models.command("show")
@click.argument("arch")
@click.option("--num-classes", default=10, show_default=True)
@click.option("--in-channels", default=3, show_default=True)
@json_option
def models_show(arch, num_classes, in_channels, as_json):
    """Layer groups of ARCH in order, with parameters per group."""
    from study.catalog import model_info
    from study.output import format_model_info

    _show(model_info(arch, num_classes, in_channels), as_json, format_model_info)


# ---- study -------------------------------------------------------------------------------------------------------
ENV_STORAGE = "DISTILLSTUDY_STORAGE"  # --storage's default (Click reads it; an empty value counts as unset)
storage_option = click.option("--storage", default=None, metavar="URL", envvar=ENV_STORAGE,
                              help="Optuna storage URL or journal:PATH (default: $DISTILLSTUDY_STORAGE, "
                                   "else the config's study.storage, else sqlite:///distillstudy.db).")
# Commands that read an existing study take no config, so no config's study.storage either.
stored_option = click.option("--storage", default=None, metavar="URL", envvar=ENV_STORAGE,
                             help="Optuna storage URL or journal:PATH (default: $DISTILLSTUDY_STORAGE, "
                                  "else sqlite:///distillstudy.db).")


@main.group(cls=_Group)
def study():
    """Create, run, inspect, export and delete studies."""


@study.command("create")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="Study name (default: the config's study.name).")
@storage_option
@set_option
@click.option("--load-if-exists", is_flag=True, help="Reuse an existing study with the same config.")
@allow_import_option
def study_create(config_path, name, storage, overrides, load_if_exists, allow):
    """Validate CONFIG, create the study, store the config in it and enqueue the baselines."""
    from study.commands import create

    _grant(allow)

    click.echo(create(config_path, name, storage, overrides, load_if_exists))


@study.command("run")
@click.argument("name", required=False)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Create the study from this config if it does not exist yet.")
@storage_option
@set_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's TOTAL of finished trials (default: the config's study.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after S seconds (> 0).")
@click.option("--n-jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Trials on threads.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's pipeline.device).")
@click.option("--quiet", is_flag=True, help="No per-trial lines.")
@click.option("--verbose", is_flag=True, help="Also print each trial's per-stage accuracy.")
@allow_import_option
def study_run(name, config_path, storage, overrides, n_trials, timeout, n_jobs, device, quiet, verbose, allow):
    """Run a worker on study NAME. With neither NAME nor --config: the quickstart study (created if needed)."""
    from study.commands import run

    _grant(allow)

    code = run(name, config_path, storage, overrides, n_trials, timeout, n_jobs, device, quiet, verbose, click.echo)
    if code == 130:
        # Interrupted and already cleaned up: skip the interpreter's slow shutdown (seconds with torch loaded), in
        # which Python restores default signal handlers and a second Ctrl-C/SIGTERM would kill us without 130.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


@study.command("confirm")
@click.argument("name")
@stored_option
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="Distinct top configurations to confirm (default: the config's study.confirm.top, else 3).")
@click.option("--seeds", type=click.IntRange(min=2), default=None,
              help="Fresh run seeds per configuration (default: the config's study.confirm.seeds).")
@click.option("--n-jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs on threads.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's pipeline.device).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
def study_confirm(name, storage, top, seeds, n_jobs, device, quiet):
    """Re-run study NAME's top configurations and its baselines on fresh seeds (companion study NAME-confirm), then
    print each one's mean target test accuracy with a 95% interval and the verdict. Resumes where it stopped."""
    from study.commands import confirm

    sys.exit(confirm(name, storage, top, seeds, n_jobs, device, quiet, click.echo))


@study.command("list")
@stored_option
@json_option
def study_list(storage, as_json):
    """Studies in the storage with trial counts and best value."""
    from study.output import format_list
    from study.workers.storage import resolve_storage_url
    from study.workers.studies import list_studies

    _show(list_studies(resolve_storage_url(storage)), as_json, format_list)


def _study_view(command: str, view: str, text: str, doc: str):
    """`study COMMAND NAME [--storage URL] [--json]`: prints `study.workers.studies.<view>(name, url)` as JSON or
    through `study.output.<text>` (imported when the command runs: the CLI starts fast)."""

    @study.command(command, help=doc)
    @click.argument("name")
    @stored_option
    @json_option
    def show(name, storage, as_json):
        from study import output
        from study.workers import studies
        from study.workers.storage import resolve_storage_url

        _show(getattr(studies, view)(name, resolve_storage_url(storage)), as_json, getattr(output, text))

    return show


study_status = _study_view("status", "study_status", "format_status",
                           "Counts by state, best so far, running trials and their age.")
study_best = _study_view("best", "best_summary", "format_best", "The winning layer actions and hyperparameters, "
                         "with source/target accuracy, beside the baselines.")


@study.command("export")
@click.argument("name")
@stored_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead of stdout (missing folders are created).")
def study_export(name, storage, fmt, out):
    """One row per trial: params, values, state, epochs, seconds, per-stage accuracies."""
    from study.commands import export

    text = export(name, storage, fmt, out)
    if text is not None:
        click.echo(text, nl=False)


@study.command("delete")
@click.argument("name")
@stored_option
@click.confirmation_option(prompt="Delete this study, its confirmation study and their checkpoints (their MLflow "
                                  "runs stay)?", help="Delete without asking.")
def study_delete(name, storage):
    """Delete study NAME, its confirmation study NAME-confirm and their stage checkpoints (their MLflow runs
    stay)."""
    from study.workers.storage import resolve_storage_url
    from study.workers.studies import delete_study

    deleted = delete_study(name, resolve_storage_url(storage))
    also = f" and its confirmation study '{deleted[1]}'" if len(deleted) > 1 else ""
    click.echo(f"deleted study '{name}'{also}, and their stage checkpoints" if also else
               f"deleted study '{name}' and its stage checkpoints")


@trial.command("replay")
@click.argument("name")
@click.argument("number", type=int)
@stored_option
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the stored config's "
                                               "pipeline.device).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def trial_replay(name, number, storage, device, as_json):
    """Rerun trial NUMBER of study NAME with its stored choices and seed; compares it bit for bit with the stored
    value, weights and per-epoch accuracies ("identical" only when all are exactly equal)."""
    from study.commands import replay
    from study.output import format_replay, format_trial

    replayed = replay(name, number, storage, device)
    if as_json:
        click.echo(json.dumps({**replayed.result.to_dict(), **replayed.to_dict()}, indent=2))
    else:
        click.echo(format_trial(replayed.result))
        click.echo(format_replay(replayed))


@main.command("ui")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Config whose tracking URI and storage to use (default: the quickstart's).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0: every interface; the UI has no login, so only on a trusted network).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="MLflow server processes: one serves a user browsing (MLflow's default, 4, each imports MLflow).")
@storage_option
def ui(config_path, host, port, workers, storage):
    """Start the MLflow UI for the study's tracking URI; once it answers, print the link to the study's runs (and
    the optuna-dashboard command)."""
    from study.commands import QUICKSTART, start_ui

    sys.exit(start_ui(config_path or str(QUICKSTART), port, storage, click.echo, host=host, workers=workers))


@study.command("report")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: reports/<NAME>/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json"]), default="html", show_default=True,
              help="html: report.html with plots (+ PNGs); md: report.md (+ PNGs); json: report.json.")
@stored_option
def study_report(name, out, fmt, storage):
    """Winner vs baselines, per-group effects with bootstrap intervals, importances and plots of study NAME."""
    from study.report import write_report
    from study.workers.storage import resolve_storage_url

    click.echo("\n".join(write_report(name, resolve_storage_url(storage), fmt, out)))


@study.command("compare")
@click.argument("names", nargs=-1, required=True)
@stored_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_compare(names, storage, as_json):
    """One table across studies NAMES: task, the winner's action per group, winner vs best baseline accuracy."""
    from study.output import format_compare
    from study.report import compare_studies
    from study.workers.storage import resolve_storage_url

    data = compare_studies(names, resolve_storage_url(storage))
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_compare(data))


if __name__ == "__main__":
    sys.exit(main())
