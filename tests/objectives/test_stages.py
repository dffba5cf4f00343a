"""What each stage does, as the README's concepts section states it: the fixed step axis, the data each stage trains
on (alpha 0: no teacher signal, no unlabelled pool), choices that would leave a stage with nothing to train on,
born-again generations, the distill stage's teacher, L2-SP anchors, alpha in the KD mix, and the delivered model
(never the teacher). Each test here fails if its step of the pipeline is broken on purpose."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import InvalidChoice
from objectives.layer_terms import l2sp_anchors
from objectives.pipeline import get_task, run_trial, select_stage
from objectives.settings import ModelSettings, PipelineSettings, TrialChoices
from objectives.stages import Stage, epoch_budget, plan_stages, stage_sources

GROUPS = ["stem", "block1", "block2", "head"]


def layers(**actions: str) -> dict[str, str]:
    """Every digitnet group fine-tuned, except those given."""
    return {g: actions.get(g, "finetune") for g in GROUPS}


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest difference between two modules' weights (parameters: BatchNorm statistics move at any lr)."""
    pb = dict(b.named_parameters())
    return max((p.detach() - pb[n].detach()).abs().max().item() for n, p in a.named_parameters())


# ---- the step axis ----------------------------------------------------------------------------------------------
def test_each_stage_owns_a_fixed_block_of_steps():
    p = PipelineSettings(finetune_epochs=2, distill_epochs=3, retrain_epochs=4)
    plan = plan_stages(p, TrialChoices(layers=layers(), generations=2))
    assert plan == [Stage("finetune", "finetune", 1, 2), Stage("distill", "distill", 3, 3),
                    Stage("retrain-1", "generation", 6, 4, 1), Stage("retrain-2", "generation", 10, 4, 2)]
    assert epoch_budget(p, 2) == 13
    # The finetune recipe: one cross-entropy stage over the whole budget of the same number of generations.
    assert plan_stages(p, TrialChoices(layers=layers(), recipe="finetune", generations=1)) == \
        [Stage("finetune", "finetune", 1, epoch_budget(p, 1))]
    # A stage the config gives no epochs is not run, and takes no steps.
    assert [s.name for s in plan_stages(dataclasses.replace(p, finetune_epochs=0),
                                        TrialChoices(layers=layers(), generations=0))] == ["distill"]


def test_a_stage_that_stops_at_its_threshold_leaves_its_block_empty(tiny_pipeline, tiny_task):
    pipeline = dataclasses.replace(tiny_pipeline, finetune_epochs=2, distill_epochs=3, retrain_epochs=2)
    reported = []
    # threshold 0: every distill stage stops after its first epoch.
    result = run_trial(tiny_task(), ModelSettings(), pipeline,
                       TrialChoices(layers=layers(), threshold=0.0, generations=1),
                       report=lambda step, value, stage: reported.append((step, stage)))
    assert reported == [(1, "finetune"), (2, "finetune"), (3, "distill"), (6, "retrain-1")]
    assert [(s.first_step, s.epochs) for s in result.stages.values()] == [(0, 1), (1, 2), (3, 1), (6, 1)]
    assert result.epochs_to_threshold == 3
    assert (result.total_epochs, result.budget) == (4, 7)


# ---- data per stage: no stage silently trains nothing, alpha 0 is no teacher signal ------------------------------
def test_alpha_zero_leaves_the_unlabelled_pool_out(tiny_pipeline, tiny_task):
    task = get_task(tiny_task(), 0, torch.device("cpu"))
    distill = Stage("distill", "distill", 2, 1)
    with_kd = stage_sources(distill, task, tiny_pipeline, TrialChoices(layers=layers(), alpha=0.3))
    without = stage_sources(distill, task, tiny_pipeline, TrialChoices(layers=layers(), alpha=0.0))
    assert [s.name for s in with_kd] == ["target_labeled", "target_unlabeled", "source"]
    assert [s.name for s in without] == ["target_labeled", "source"]
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline, TrialChoices(layers=layers(), alpha=0.0))
    assert result.stages["distill"].sources == {"target_labeled": 1.0, "source": 0.5}
    assert result.stages["retrain-1"].sources == {"target_labeled": 1.0, "source": 0.5}


@pytest.mark.parametrize("task_kwargs,pipeline_kwargs,choice_kwargs,message", [
    ({"target_labeled_per_class": 0}, {}, {"source_weight": 0.0},
     "stage 'finetune' would train on no data: no labelled target images (task.target_labeled_per_class is 0); "
     "search.source_weight is 0"),
    ({"target_labeled_per_class": 0}, {"finetune_epochs": 0}, {"source_weight": 0.0, "alpha": 0.0},
     "stage 'distill' would train on no data: no labelled target images (task.target_labeled_per_class is 0); "
     "the unlabelled target pool is unused without KD (search.alpha is 0); search.source_weight is 0"),
    ({"target_labeled_per_class": 0}, {"finetune_epochs": 0, "distill_epochs": 0, "retrain_on": "target"},
     {"alpha": 0.0}, "stage 'retrain-1' would train on no data"),
    ({}, {"finetune_epochs": 0, "distill_epochs": 0}, {"generations": 0}, "recipe 'distill' trains no stage"),
    ({}, {}, {"layers": {g: "freeze" for g in GROUPS}}, "every layer group is 'freeze': nothing would train"),
])
def test_a_stage_with_nothing_to_train_is_rejected_before_any_training(task_kwargs, pipeline_kwargs, choice_kwargs,
                                                                        message, tiny_pipeline, tiny_task, tmp_path):
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path), **pipeline_kwargs)
    choices = TrialChoices(**{"layers": layers(), **choice_kwargs})
    with pytest.raises(InvalidChoice, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        run_trial(tiny_task(**task_kwargs), ModelSettings(), pipeline, choices)
    assert not list(tmp_path.iterdir())  # rejected before the teacher was trained


# ---- the delivered model ----------------------------------------------------------------------------------------
def test_the_teacher_is_never_delivered(tiny_pipeline, tiny_task):
    # digits-noise: a teacher trained on the source keeps some target accuracy; a student whose head is replaced
    # and barely trained (lr 1e-7), every other group frozen, is near chance. The teacher must not stand in for it.
    pipeline = dataclasses.replace(tiny_pipeline, teacher_epochs=10)
    choices = TrialChoices(layers=layers(stem="freeze", block1="freeze", block2="freeze", head="replace"), lr=1e-7)
    result = run_trial(tiny_task("digits-noise"), ModelSettings(), pipeline, choices)
    teacher_val = result.stages["teacher"].target_val_acc
    assert result.best_stage != "teacher"
    assert result.value < teacher_val
    assert result.value == result.stages[result.best_stage].target_val_acc
    assert result.student is result.models[result.best_stage] and result.student is not result.models["teacher"]
    student_stages = {k: v.target_val_acc for k, v in result.stages.items() if k != "teacher"}
    assert result.value == max(student_stages.values())


def test_select_best_takes_the_first_of_equals_and_last_takes_the_last():
    val = {"finetune": 0.5, "distill": 0.7, "retrain-1": 0.7, "retrain-2": 0.6}
    assert select_stage(val, "best") == "distill"
    assert select_stage(val, "last") == "retrain-2"


def test_select_last_delivers_the_last_stage(tiny_pipeline, tiny_task):
    pipeline = dataclasses.replace(tiny_pipeline, select="last")
    result = run_trial(tiny_task(), ModelSettings(), pipeline, TrialChoices(layers=layers(), generations=1))
    assert (result.best_stage, result.select) == ("retrain-1", "last")
    assert result.value == result.stages["retrain-1"].target_val_acc
    assert result.student is result.models["retrain-1"]


# ---- born-again generations (Furlanello et al., 2018) -----------------------------------------------------------
def test_each_generation_is_a_fresh_student_taught_by_the_previous_one(tiny_pipeline, tiny_task):
    # lr 1e-7: training barely moves any weight, so each model still shows where it started from.
    choices = TrialChoices(layers=layers(head="replace"), lr=1e-7, alpha=1.0, generations=2, threshold=1.0)
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline, choices)
    m, teacher = result.models, result.models["teacher"]
    assert [result.stages[s].kd_teacher for s in ("finetune", "distill", "retrain-1", "retrain-2")] == \
        [None, "teacher", "distill", "retrain-1"]
    # distill continues the finetuned student; each generation starts afresh: inherited groups from the teacher's
    # weights, the replaced head newly initialised (not copied from the generation before).
    assert max_abs_diff(m["distill"].groups["head"], m["finetune"].groups["head"]) < 1e-4
    for g, before in (("retrain-1", "distill"), ("retrain-2", "retrain-1")):
        assert max_abs_diff(m[g].groups["head"], m[before].groups["head"]) > 1e-2, g
        for group in ("stem", "block1", "block2"):
            assert max_abs_diff(m[g].groups[group], teacher.groups[group]) < 1e-4, (g, group)


def test_distill_teacher_best_distils_from_the_better_of_teacher_and_finetuned_student(tiny_pipeline, tiny_task):
    # digits-invert: the source teacher is near chance on the inverted target, the finetuned student is not.
    pipeline = dataclasses.replace(tiny_pipeline, teacher_epochs=10, finetune_epochs=3)
    choices = TrialChoices(layers=layers(), alpha=1.0, generations=0, threshold=1.0)
    best = run_trial(tiny_task(), ModelSettings(), pipeline, choices)
    source = run_trial(tiny_task(), ModelSettings(), dataclasses.replace(pipeline, distill_teacher="source"), choices)
    assert best.stages["finetune"].target_val_acc > best.stages["teacher"].target_val_acc
    assert (best.stages["distill"].kd_teacher, source.stages["distill"].kd_teacher) == ("finetune", "teacher")
    assert max_abs_diff(best.models["distill"], source.models["distill"]) > 1e-3  # it really taught


# ---- alpha in the KD mix ----------------------------------------------------------------------------------------
def test_alpha_changes_what_the_distill_stage_learns(tiny_pipeline, tiny_task):
    curves = {}

    def run(alpha):
        curves[alpha] = []
        on_epoch = lambda stage, step, m: curves[alpha].append(m["kd_loss"]) if stage == "distill" else None  # noqa
        return run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                         TrialChoices(layers=layers(), alpha=alpha, generations=0, threshold=1.0), on_epoch=on_epoch)

    low, high = run(0.2), run(0.9)
    assert curves[0.2] != curves[0.9]
    assert max_abs_diff(low.models["distill"], high.models["distill"]) > 1e-4


# ---- L2-SP (Li, Grandvalet & Davoine, 2018) ---------------------------------------------------------------------
def test_l2sp_anchors_are_the_teachers_source_weights_of_finetuned_groups(tiny_pipeline, tiny_task):
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                       TrialChoices(layers=layers(stem="freeze", block1="replace"), generations=0))
    teacher = result.models["teacher"]
    anchors = l2sp_anchors(teacher, result.layer_map)
    assert {n.split(".")[1] for n in anchors} == {"block2", "head"}
    own = dict(teacher.named_parameters())
    assert all(torch.equal(anchors[n], own[n]) for n in anchors)
    trained = dict(result.models["distill"].named_parameters())
    assert any(not torch.equal(anchors[n], trained[n]) for n in anchors)  # the student did move away


def test_the_params_term_pulls_towards_the_teacher_not_the_stage_start(tiny_pipeline, tiny_task):
    # After three finetune epochs the student is far from the teacher; at the start of distill the term is that
    # distance (it would be 0 if it were anchored to the weights at the stage's start).
    pipeline = dataclasses.replace(tiny_pipeline, finetune_epochs=3, distill_epochs=1, layer_term="params")
    terms = []
    result = run_trial(tiny_task(), ModelSettings(), pipeline,
                       TrialChoices(layers=layers(), beta=1.0, generations=0, threshold=1.0),
                       on_epoch=lambda stage, step, m: terms.append(m["layer_term"]) if stage == "distill" else None)
    teacher, finetuned = dict(result.models["teacher"].named_parameters()), result.models["finetune"]
    distance = sum(((p.detach() - teacher[n].detach()) ** 2).sum().item() for n, p in finetuned.named_parameters())
    assert distance > 0 and terms[0] > 0.5 * distance
