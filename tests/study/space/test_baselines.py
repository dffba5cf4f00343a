"""The three baselines do exactly what their names say, at the epoch budget of a default trial: finetune-all and
head-only train with cross-entropy alone (no teacher, no unlabelled pool, no distill or retrain stage), and
finetune-all-kd runs the default distillation recipe with every group fine-tuned."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from objectives.pipeline import run_trial
from objectives.stages import epoch_budget
from study.config.config import load_config
from study.space.baselines import BASELINES, baseline_choices

GROUPS = ["stem", "block1", "block2", "head"]


@pytest.fixture
def config(repo_root):
    # generations default 1, so a default trial trains finetune + distill + one born-again generation.
    return load_config(repo_root / "examples" / "quickstart.yaml", ["search.generations={low: 0, high: 2, default: 1}"])


def test_baseline_choices(config):
    space = config.search
    assert set(BASELINES) == {"finetune-all", "head-only", "finetune-all-kd"}
    with pytest.raises(KeyError):
        baseline_choices("nope", space)
    default = space.defaults()
    ft = baseline_choices("finetune-all", space)
    assert (ft.recipe, ft.alpha, ft.beta) == ("finetune", 0.0, 0.0)
    assert ft.layers == {g: "finetune" for g in GROUPS}
    head = baseline_choices("head-only", space)
    assert (head.recipe, head.alpha, head.beta) == ("finetune", 0.0, 0.0)
    assert head.layers == {"stem": "freeze", "block1": "freeze", "block2": "freeze", "head": "finetune"}
    kd = baseline_choices("finetune-all-kd", space)
    assert kd.recipe == "distill" and kd.layers == {g: "finetune" for g in GROUPS}
    assert (kd.alpha, kd.temperature, kd.generations) == (default.alpha, default.temperature, default.generations)
    assert default.alpha > 0
    # Every baseline's budget is the default trial's.
    assert {baseline_choices(b, space).generations for b in BASELINES} == {default.generations}


def test_baselines_run_their_recipes_at_a_default_trials_budget(config, tiny_pipeline, tiny_task):
    pipeline = dataclasses.replace(tiny_pipeline, finetune_epochs=1, distill_epochs=2, retrain_epochs=1)
    budget = epoch_budget(pipeline, config.search.defaults().generations)
    assert budget == 4
    runs = {name: run_trial(tiny_task(), config.model, pipeline, baseline_choices(name, config.search))
            for name in BASELINES}
    for name in ("finetune-all", "head-only"):
        result = runs[name]
        assert list(result.stages) == ["teacher", "finetune"], name
        stage = result.stages["finetune"]
        assert (stage.first_step, stage.epochs, result.total_epochs, result.budget) == (1, budget, budget, budget)
        assert stage.kd_teacher is None and stage.sources == {"target_labeled": 1.0, "source": 0.5}
    assert {g: m["action"] for g, m in runs["finetune-all"].layer_map.items()} == {g: "finetune" for g in GROUPS}
    # head-only: a linear probe; every other group is the teacher's, bit for bit.
    probe = runs["head-only"]
    for g in ("stem", "block1", "block2"):
        want, got = probe.models["teacher"].groups[g].state_dict(), probe.student.groups[g].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), g
    assert not torch.equal(probe.student.groups["head"][2].weight, probe.models["teacher"].groups["head"][2].weight)
    kd = runs["finetune-all-kd"]
    assert list(kd.stages) == ["teacher", "finetune", "distill", "retrain-1"]
    assert kd.budget == budget
    assert kd.stages["distill"].kd_teacher is not None and "target_unlabeled" in kd.stages["distill"].sources
