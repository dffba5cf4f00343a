"""The domain-adversarial layer term `dann` (Ganin et al., 2016): the gradient-reversal layer flips and scales the
gradient, the coefficient follows the paper's schedule, the features get exactly the reversed gradient of the
domain loss while the domain classifier gets it unreversed, and a trial runs with it (unlabelled target pool
included, even without KD), or is rejected before training when it could not act."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models import InvalidChoice, create_model
from objectives.dann import DomainClassifier, dann_group, domain_loss, reversal_coefficient, reverse_gradient
from objectives.layer_terms import LayerTermContext, get_layer_term, layer_term_choices
from objectives.pipeline import run_trial
from objectives.settings import ModelSettings, PipelineSettings, TrialChoices
from objectives.student import build_student
from objectives.train import StepInfo

GROUPS = ["stem", "block1", "block2", "head"]


def test_the_reversal_layer_is_the_identity_forward_and_flips_the_gradient_backward():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)


def test_the_coefficient_follows_the_dann_schedule():
    assert reversal_coefficient(0.0) == 0.0
    assert reversal_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert reversal_coefficient(1.0) == pytest.approx(0.9999092, abs=1e-7)
    ramp = [reversal_coefficient(p / 10) for p in range(11)]
    assert ramp == sorted(ramp) and len(set(ramp)) == 11


def test_the_domain_loss_weighs_both_domains_equally_and_needs_both():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.5, 0.5])
    is_target = torch.tensor([True, False, False, False, False])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = 0.5 * (bce(logits[:1], torch.ones(1)) + bce(logits[1:], torch.zeros(4)))
    assert domain_loss(logits, is_target) == pytest.approx(want.item())
    assert domain_loss(logits, is_target, counts=(4, 1)) == pytest.approx(want.item())  # counts known on the host
    assert domain_loss(logits, torch.zeros(5, dtype=torch.bool)).item() == 0.0


def test_the_domain_classifier_pools_positions_and_tokens_away():
    """A (C, H, W) group output is average-pooled, a (tokens, F) one averaged over its tokens: the classifier's
    first layer sees C or F inputs, not every position (a ViT block's 197 x 768)."""
    assert DomainClassifier((12, 4, 4)).net[0].in_features == 12
    tokens = DomainClassifier((197, 16))
    assert tokens.net[0].in_features == 16 and tokens(torch.randn(3, 197, 16)).shape == (3,)


def _context(student, teacher, pipeline=None):
    return LayerTermContext(student=student, teacher=teacher, source_teacher=teacher,
                            layer_map={g: {"action": "finetune"} for g in GROUPS}, image_shape=(1, 8, 8),
                            device=torch.device("cpu"), seed=0, stage="distill",
                            pipeline=pipeline or PipelineSettings())


@pytest.mark.parametrize("progress", [0.3, 0.9])
def test_features_get_the_reversed_domain_gradient_and_the_classifier_the_plain_one(progress):
    teacher = create_model("digitnet", 10, 1)
    student, _ = build_student(teacher, {g: "finetune" for g in GROUPS}, "reinit", 0.5, None, (1, 8, 8), 0)
    term = get_layer_term("dann")(_context(student, teacher))
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    term.on_step(StepInfo(domains=(("target", 5), ("target", 3), ("source", 4)), progress=progress))
    student.eval()  # the same BatchNorm arithmetic in both passes
    student(x)
    loss = term.term()
    stem = student.groups["stem"][0].weight
    reversed_grads = torch.autograd.grad(loss, [stem, *term.params])
    # The same loss without the reversal: block2's features straight into the classifier's parameters.
    features = student.groups["block2"](student.groups["block1"](student.groups["stem"](x)))
    plain_grads = torch.autograd.grad(_classifier_loss(term, features), [stem, *term.params])
    lam = reversal_coefficient(progress)
    assert torch.allclose(reversed_grads[0], -lam * plain_grads[0], atol=1e-7)
    assert reversed_grads[0].abs().sum() > 0
    for got, want in zip(reversed_grads[1:], plain_grads[1:]):  # the classifier learns to tell the domains apart
        assert torch.allclose(got, want, atol=1e-7)
    term.close()
    assert not any(m._forward_hooks for m in student.modules())


def _classifier_loss(term, features):
    """The dann term's loss on `features` with no reversal, through the term's own classifier parameters."""
    w1, b1, w2, b2 = term.params
    pooled = features.mean(dim=(2, 3))
    logits = (torch.relu(pooled @ w1.T + b1) @ w2.T + b2).squeeze(1)
    return domain_loss(logits, torch.tensor([True] * 8 + [False] * 4))


def test_the_classifier_reads_the_last_group_before_the_head_unless_told():
    assert dann_group(GROUPS, "") == "block2"
    assert dann_group(GROUPS, "stem") == "stem"
    with pytest.raises(InvalidChoice, match="unknown layer group 'blok1' \\(did you mean 'block1'"):
        dann_group(GROUPS, "blok1")


def test_a_trial_with_dann_trains_on_the_target_pool_even_without_kd(tiny_pipeline, tiny_task):
    metrics: dict[str, dict] = {}
    acts = {"stem": "freeze", "block1": "finetune", "block2": "adapt", "head": "finetune"}
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                       TrialChoices(layers=acts, alpha=0.0, beta=0.5, layer_term="dann", generations=1,
                                    threshold=1.0),
                       on_epoch=lambda stage, step, m: metrics.__setitem__(stage, m))
    assert result.params["layer_term"] == "dann"
    for stage in ("distill", "retrain-1"):
        assert result.stages[stage].sources["target_unlabeled"] == 1.0  # alpha 0, yet the domain classifier's
        assert metrics[stage]["layer_term"] > 0
    assert "layer_term" not in metrics["finetune"]
    assert all(not m._forward_hooks for model in result.models.values() for m in model.modules())


def test_a_trial_without_a_term_records_none(tiny_pipeline, tiny_task):
    result = run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, layer_term="none"),
                       TrialChoices(layers={g: "finetune" for g in GROUPS}, alpha=0.0, beta=0.5, generations=0))
    assert result.params["layer_term"] == "none"
    assert "target_unlabeled" not in result.stages["distill"].sources  # alpha 0 and no term: no pool
    assert layer_term_choices()[:4] == ["none", "feature", "params", "dann"]


@pytest.mark.parametrize("acts,pipeline,trial,message", [
    ({"stem": "freeze", "block1": "freeze", "block2": "freeze", "head": "finetune"}, {}, {},
     "every group up to it \\(stem, block1, block2\\) is frozen"),
    ({g: "finetune" for g in GROUPS}, {}, {"source_weight": 0.0},
     "needs source and target data in one distilling stage"),
])
def test_a_dann_term_that_could_not_act_is_rejected_before_training(acts, pipeline, trial, message, tiny_pipeline,
                                                                     tiny_task):
    with pytest.raises(InvalidChoice, match=message):
        run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, **pipeline),
                  TrialChoices(layers=acts, beta=0.5, layer_term="dann", **trial))
