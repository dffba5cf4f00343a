"""distillstudy's command line: a thin Click layer. Each command parses, calls one function, prints.

User errors (bad config, unknown names, missing data, unreachable storage) print one line and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from models.errors import UserError


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except RuntimeError as exc:
            from objectives.train import TrainingDiverged

            if not isinstance(exc, TrainingDiverged):
                raise
            # Not bad input but a failed run: one line, exit code 1.
            click.echo(f"trial failed: {exc}", err=True)
            ctx.exit(1)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """distillstudy: which layers to freeze, fine-tune or replace, and how to distill, found by an Optuna study."""


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key, e.g. --set search.layers.head=finetune (repeatable).")


# ---- trial -------------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def trial():
    """Run or replay a single pipeline."""


@trial.command("run")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML config (default: the quickstart, examples/quickstart.yaml).")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def trial_run(config_path, overrides, as_json):
    """Run ONE pipeline with fixed choices (range defaults, first list elements, pins) and print per-stage accuracy."""
    from study.config import load_config
    from study.trial import format_trial, run_fixed_trial

    from study.commands import QUICKSTART

    result = run_fixed_trial(load_config(config_path or str(QUICKSTART), overrides))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_trial(result))


# ---- catalogs ----------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def tasks():
    """Built-in and torchvision-backed tasks."""


@tasks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tasks_list(as_json):
    """List tasks with shift type, sizes and image shape (sizes for the offline tasks)."""
    from study.catalog import tasks_catalog

    rows = tasks_catalog()
    if as_json:
        return _echo_json(rows)
    for r in rows:
        shape = "x".join(map(str, r["image_shape"])) if "image_shape" in r else "-"
        sizes = "/".join(str(r["sizes"][k]) for k in ("source_train", "target_labeled", "target_unlabeled",
                                                         "target_val", "target_test")) if "sizes" in r else "(your data)"
        click.echo(f"{r['name']:<15} {r['shift']:<8} {shape:<8} {sizes:<22} {r['description']}")


@main.group(cls=_Group)
def models():
    """Architectures and their layer groups."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_list(as_json):
    """List architectures with their layer groups."""
    from study.catalog import models_catalog

    rows = models_catalog()
    if as_json:
        return _echo_json(rows)
    for r in rows:
        click.echo(f"{r['arch']:<20} {r['params']:>11,}  " + " -> ".join(g["name"] for g in r["groups"]))


@models.command("show")
@click.argument("arch")
@click.option("--num-classes", default=10, show_default=True)
@click.option("--in-channels", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_show(arch, num_classes, in_channels, as_json):
    """Layer groups of ARCH in order, with parameters per group."""
    from study.catalog import model_info

    info = model_info(arch, num_classes, in_channels)
    if as_json:
        return _echo_json(info)
    for g in info["groups"]:
        click.echo(f"{g['name']:<12} {g['params']:>11,}")
    click.echo(f"{'total':<12} {info['params']:>11,}")


# ---- study -------------------------------------------------------------------------------------------------------
storage_option = click.option("--storage", default=None, metavar="URL",
                              help="Optuna storage URL or journal:PATH (default: $DISTILLSTUDY_STORAGE, "
                                   "else the config's study.storage, else sqlite:///distillstudy.db).")


@main.group(cls=_Group)
def study():
    """Create, run, inspect, export and delete studies."""


@study.command("create")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="Study name (default: the config's study.name).")
@storage_option
@set_option
@click.option("--load-if-exists", is_flag=True, help="Reuse an existing study with the same config.")
def study_create(config_path, name, storage, overrides, load_if_exists):
    """Validate CONFIG, create the study, store the config in it and enqueue the baselines."""
    from study.commands import create

    click.echo(create(config_path, name, storage, overrides, load_if_exists))


@study.command("run")
@click.argument("name", required=False)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Create the study from this config if it does not exist yet.")
@storage_option
@set_option
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="The study's TOTAL of finished trials (default: the config's study.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop starting trials after S seconds.")
@click.option("--n-jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Trials on threads.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's pipeline.device).")
@click.option("--quiet", is_flag=True, help="No per-trial lines.")
@click.option("--verbose", is_flag=True, help="Also print each trial's per-stage accuracy.")
def study_run(name, config_path, storage, overrides, n_trials, timeout, n_jobs, device, quiet, verbose):
    """Run a worker on study NAME. With neither NAME nor --config: the quickstart study (created if needed)."""
    from study.commands import run

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
@storage_option
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
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_list(storage, as_json):
    """Studies in the storage with trial counts and best value."""
    from study.commands import format_list
    from study.storage import resolve_storage_url
    from study.studies import list_studies

    rows = list_studies(resolve_storage_url(storage))
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_list(rows))


@study.command("status")
@click.argument("name")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_status(name, storage, as_json):
    """Counts by state, best so far, running trials and their age."""
    from study.commands import format_status
    from study.storage import resolve_storage_url
    from study.studies import study_status as status

    data = status(name, resolve_storage_url(storage))
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_status(data))


@study.command("best")
@click.argument("name")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_best(name, storage, as_json):
    """The winning layer actions and hyperparameters, with source/target accuracy, beside the baselines."""
    from study.commands import format_best
    from study.storage import resolve_storage_url
    from study.studies import best_summary

    data = best_summary(name, resolve_storage_url(storage))
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_best(data))


@study.command("export")
@click.argument("name")
@storage_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
def study_export(name, storage, fmt, out):
    """One row per trial: params, values, state, epochs, seconds, per-stage accuracies."""
    from study.storage import resolve_storage_url
    from study.studies import export_trials

    text = export_trials(name, resolve_storage_url(storage), fmt)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


@study.command("delete")
@click.argument("name")
@storage_option
@click.option("--yes", is_flag=True, required=True, help="Confirm.")
def study_delete(name, storage, yes):
    """Delete study NAME (its MLflow runs stay)."""
    from study.storage import resolve_storage_url
    from study.studies import delete_study

    delete_study(name, resolve_storage_url(storage))
    click.echo(f"deleted study '{name}'")


@trial.command("replay")
@click.argument("name")
@click.argument("number", type=int)
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def trial_replay(name, number, storage, as_json):
    """Rerun trial NUMBER of study NAME with its stored choices and seed; compares with the stored accuracy."""
    from study.commands import replay
    from study.trial import format_trial

    result, stored = replay(name, number, storage)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "stored_value": stored}, indent=2))
    else:
        click.echo(format_trial(result))
        click.echo(f"stored value: {stored}  replayed: {result.value}  "
                   f"{'identical' if stored == result.value else 'DIFFERENT'}")


@main.command("ui")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Config whose tracking URI and storage to use (default: the quickstart's).")
@click.option("--port", default=5000, show_default=True, type=int)
@storage_option
def ui(config_path, port, storage):
    """Start the MLflow UI on 127.0.0.1 for the study's tracking URI (and print the optuna-dashboard command)."""
    from study.commands import QUICKSTART, start_ui

    sys.exit(start_ui(config_path or str(QUICKSTART), port, storage, click.echo))


@study.command("report")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: reports/<NAME>/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json"]), default="html", show_default=True,
              help="html: report.html with plots (+ PNGs); md: report.md (+ PNGs); json: report.json.")
@storage_option
def study_report(name, out, fmt, storage):
    """Winner vs baselines, per-group effects with bootstrap intervals, importances and plots of study NAME."""
    from study.report import write_report
    from study.storage import resolve_storage_url

    click.echo("\n".join(write_report(name, resolve_storage_url(storage), fmt, out)))


@study.command("compare")
@click.argument("names", nargs=-1, required=True)
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def study_compare(names, storage, as_json):
    """One table across studies NAMES: task, the winner's action per group, winner vs best baseline accuracy."""
    from study.report import compare_studies, format_compare
    from study.storage import resolve_storage_url

    data = compare_studies(names, resolve_storage_url(storage))
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_compare(data))


if __name__ == "__main__":
    sys.exit(main())
