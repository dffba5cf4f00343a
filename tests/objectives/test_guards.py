"""Guards on what a trial learns from: the unlabelled target pool's true labels never reach training, and the KD
teacher is in eval mode whenever a student learns from it. Real training on a tiny task, no mocks."""

from __future__ import annotations

import dataclasses

import torch

from models import GroupedModel
from objectives.pipeline import get_task, run_trial
from objectives.settings import ModelSettings, TrialChoices

LAYERS = {"stem": "finetune", "block1": "finetune", "block2": "finetune", "head": "finetune"}
# KD on the pool, a born-again generation and a layer term that reads the pool: every path that trains on it.
KD = TrialChoices(layers=LAYERS, alpha=0.7, temperature=3.0, generations=1, lr=0.002)


def _pipeline(tiny_pipeline):
    return dataclasses.replace(tiny_pipeline, seed=3)


def test_the_unlabelled_pools_labels_never_reach_training(tiny_pipeline, tiny_task):
    # Its own task options, so the poisoned labels stay in a process-cache entry of this test alone.
    options = tiny_task("digits-invert", max_per_domain=240)
    pipeline = _pipeline(tiny_pipeline)
    first = run_trial(options, ModelSettings(), pipeline, KD)
    pool = get_task(options, pipeline.seed, torch.device("cpu")).target_unlabeled
    true_labels = pool.y.clone()
    try:
        pool.y.copy_((true_labels + 1 + torch.arange(len(true_labels)) % 5) % 10)  # every label wrong
        poisoned = run_trial(options, ModelSettings(), pipeline, KD)
    finally:
        pool.y.copy_(true_labels)
    assert first.stages["distill"].sources.get("target_unlabeled"), "the pool must be trained on for this test"
    # Training that read the pool's labels would learn other weights from wrong ones, in some stage.
    assert set(poisoned.models) == set(first.models) >= {"distill", "retrain-1"}
    for stage, model in first.models.items():
        other = poisoned.models[stage].state_dict()
        assert all(torch.equal(w, other[k]) for k, w in model.state_dict().items()), f"stage {stage} differs"


def test_the_kd_teacher_is_in_eval_mode_while_students_learn_from_it(tiny_pipeline, tiny_task):
    calls: list[bool] = []

    def watch(module, _inputs):
        # A frozen GroupedModel run while autograd records the student: a KD teacher giving its targets.
        if isinstance(module, GroupedModel) and not any(p.requires_grad for p in module.parameters()):
            calls.append(module.training)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        run_trial(tiny_task("digits-invert"), ModelSettings(), _pipeline(tiny_pipeline), KD)
    finally:
        handle.remove()
    assert calls, "no teacher forward seen: the test watches the wrong thing"
    # In train mode its BatchNorm would use each batch's statistics (and move its running ones): wrong targets.
    assert not any(calls), f"{sum(calls)} of {len(calls)} teacher forwards in train mode"
