"""`study best` shows the winner's choices that mattered, not the defaults of the ones that did not: no
temperature when alpha is 0, no slim width when no group was slimmed, no KD choices for the finetune recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from study.config.config import load_config
from study.output import format_best
from study.trials import record
from study.workers.studies import best_summary, create_study

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
# Told by hand with ask/tell: no heartbeat thread, on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")]


def _winner_text(tmp_path, sets: list[str], **changes) -> str:
    """A study whose only completed trial ran the default choices with `changes`; its `study best` text."""
    config = load_config(QUICKSTART, ["tracking.enabled=false", *sets])
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, _ = create_study(config, "w", url)
    trial = study.ask()  # the study's first enqueued baseline, told by hand with the choices under test
    record.write_start(trial, dataclasses.replace(config.search.defaults(), **changes), 0)
    study.tell(trial, 0.5)
    return format_best(best_summary("w", url)).splitlines()[2]  # the hyperparameter line


def test_winner_line_hides_temperature_with_alpha_zero_and_an_unused_slim_width(tmp_path):
    layers = {"stem": "finetune", "block1": "finetune", "block2": "freeze", "head": "finetune"}
    line = _winner_text(tmp_path, ["pipeline.replace_with=slim"], alpha=0.0, layers=layers)
    assert "alpha=0" in line and "lr=" in line
    assert "temperature" not in line and "slim_width" not in line, line


def test_winner_line_shows_them_when_they_mattered(tmp_path):
    layers = {"stem": "finetune", "block1": "replace", "block2": "freeze", "head": "finetune"}
    line = _winner_text(tmp_path, ["pipeline.replace_with=slim"], alpha=0.3, layers=layers)
    assert "temperature=" in line and "slim_width=" in line, line


def test_winner_line_of_the_finetune_recipe_has_no_kd_choices(tmp_path):
    line = _winner_text(tmp_path, [], recipe="finetune", alpha=0.0, beta=0.0)
    assert "recipe=finetune" in line
    for hidden in ("alpha", "temperature", "beta", "threshold", "generations", "slim_width"):
        assert f"{hidden}=" not in line, line


def test_a_distill_trial_that_delivered_its_finetune_stage_says_so_and_counts_as_finetune(tmp_path):
    from study.report.stats import choice_effects
    from study.space.search import applicable_choices

    config = load_config(QUICKSTART, ["tracking.enabled=false"])
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, _ = create_study(config, "w", url)
    trial = study.ask()
    choices = dataclasses.replace(config.search.defaults(), recipe="distill", alpha=0.5, beta=0.3,
                                  layer_term="feature")
    record.write_start(trial, choices, 0)
    acc = {"source_val_acc": 0.9, "source_test_acc": 0.9, "target_val_acc": 0.8, "target_test_acc": 0.7}
    trial.set_user_attr("stages", {"finetune": acc, "distill": {**acc, "target_val_acc": 0.6}})
    trial.set_user_attr("best_stage", "finetune")  # pipeline.select picked the fine-tuned stage
    study.tell(trial, 0.8)
    assert "delivered: finetune stage, not distilled" in format_best(best_summary("w", url)).splitlines()[0]
    effects = choice_effects(study.get_trials(), ["recipe", "layer_term"], ["target_val_acc"],
                             lambda flat: applicable_choices(config.search, config.pipeline.replace_with, flat))
    assert list(effects["recipe"]["actions"]) == ["finetune"]  # what it delivered, not the recipe it ran
    assert not effects["layer_term"]["actions"]  # its layer term shaped no delivered weight
