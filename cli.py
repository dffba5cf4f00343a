"""distillstudy's command line: a thin Click layer. Each command parses, calls one function, prints.

User errors (bad config, unknown names, missing data, unreachable storage) print one line and exit with code 2.
"""

from __future__ import annotations

import json
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
@click.option("--config", "config_path", default="examples/quickstart.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="YAML config.")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def trial_run(config_path, overrides, as_json):
    """Run ONE pipeline with fixed choices (range defaults, first list elements, pins) and print per-stage accuracy."""
    from study.config import load_config
    from study.trial import format_trial, run_fixed_trial

    result = run_fixed_trial(load_config(config_path, overrides))
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


if __name__ == "__main__":
    sys.exit(main())
