"""Domain-adversarial training as beta's layer term `dann` (DANN: Ganin, Ustinova, Ajakan, Germain, Larochelle,
Laviolette, Marchand & Lempitsky, 2016, "Domain-adversarial training of neural networks", JMLR 17(59)).

A small domain classifier D reads the output f of one layer group (`pipeline.dann_group`; default the last group
before the head) through a gradient-reversal layer R_lambda, and learns to tell source examples from target ones
(the target's labelled subset and its unlabelled pool both count as target):

    term = 1/2 * (mean_{x in source} BCE(D(R(f(x))), 0) + mean_{x in target} BCE(D(R(f(x))), 1))

R is the identity forward and multiplies the gradient by -lambda backward, so the one loss `beta * term` trains D
to separate the domains and the student's trainable groups up to the chosen one to make their features
indistinguishable. lambda follows the paper's schedule over each distilling stage, lambda_p = 2 / (1 + exp(-10 p))
- 1 with p the stage's progress from 0 to 1 (a noisy classifier early in the stage cannot push the features
around). beta plays the role of the domain loss weight; the adversarial signal the features get is beta *
lambda_p. Both domains must be in the batch: a stage that trains on one (`pipeline.retrain_on: source`) adds 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import InvalidChoice, derive_seed, group_output_shapes, seeded_init
from models.errors import did_you_mean
from models.grouped import hook_group_outputs

from .layer_terms import LayerTerm, LayerTermContext, LayerTermPlan, register_layer_term
from .train import StepInfo

HIDDEN_UNITS = 100  # the domain classifier's one hidden layer: small next to the groups it judges


class GradientReversal(torch.autograd.Function):
    """R_lambda (Ganin & Lempitsky, 2015): forward x -> x, backward g -> -lambda * g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """`x` unchanged, its gradient multiplied by -coeff on the way back."""
    return GradientReversal.apply(x, coeff)


def reversal_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1 (gamma = 10 in the paper): 0 at p = 0, rising
    smoothly towards 1 as p -> 1."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class TokenMean(nn.Module):
    """(N, tokens, F) -> (N, F): a transformer group's features averaged over its tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class DomainClassifier(nn.Module):
    """Features of one group -> one logit (target vs source): a global average pool for (C, H, W) features, a mean
    over the tokens for (tokens, F) ones, then Linear(C or F, 100), ReLU, Linear(100, 1)."""

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        if len(feature_shape) == 3:  # (C, H, W): DANN classifies a feature vector, so pool the positions away
            self.pool, in_features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), feature_shape[0]
        elif len(feature_shape) == 2:  # (tokens, F): likewise, pool the tokens away (not 197 x 768 inputs)
            self.pool, in_features = TokenMean(), feature_shape[-1]
        else:
            self.pool, in_features = nn.Flatten(), math.prod(feature_shape)
        self.net = nn.Sequential(nn.Linear(in_features, HIDDEN_UNITS), nn.ReLU(), nn.Linear(HIDDEN_UNITS, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(self.pool(f)).squeeze(1)


def domain_loss(logits: torch.Tensor, is_target: torch.Tensor,
                counts: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean BCE of each domain's examples, averaged over the two domains (so the larger one does not dominate);
    0 when the batch holds one domain only. `counts` (source rows, target rows), when the caller knows them on the
    host, spares reading them back from the device every step (a GPU sync)."""
    target = is_target.float()
    per_example = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    if counts is None:
        counts = (int((~is_target).sum()), int(is_target.sum()))
    n_source, n_target = counts
    if n_target == 0 or n_source == 0:
        return per_example.sum() * 0.0
    return 0.5 * ((per_example * target).sum() / n_target + (per_example * (1 - target)).sum() / n_source)


def dann_group(group_names: list[str], configured: str) -> str:
    """The group the domain classifier reads: `pipeline.dann_group`, or '' = the last group before the head."""
    if not configured:
        return group_names[-2] if len(group_names) > 1 else group_names[-1]
    if configured not in group_names:
        raise InvalidChoice(f"pipeline.dann_group: unknown layer group '{configured}'"
                            f"{did_you_mean(configured, group_names)}; groups: {', '.join(group_names)}")
    return configured


def check_dann(plan: LayerTermPlan) -> None:
    """Reject, before training, a dann term that could not act: no trainable group at or before the classifier's
    group (the reversed gradient would move nothing), or no distilling stage with both domains in its batches."""
    groups = list(plan.layer_map)
    group = dann_group(groups, plan.pipeline.dann_group)
    upstream = groups[:groups.index(group) + 1]
    if all(plan.layer_map[g]["action"] == "freeze" for g in upstream):
        raise InvalidChoice(f"layer term dann reads group '{group}', but every group up to it ({', '.join(upstream)})"
                            f" is frozen: its reversed gradient would train nothing")
    if not any({s.domain for s in sources} == {"source", "target"} for sources in plan.stage_sources.values()):
        raise InvalidChoice("layer term dann needs source and target data in one distilling stage (search."
                            "source_weight is 0, or pipeline.retrain_on leaves one domain out)")


@register_layer_term("dann", uses_target_pool=True, check=check_dann)
def dann(ctx: LayerTermContext) -> LayerTerm:
    """The DANN term (see the module docstring): a domain classifier, drawn from the run seed and the stage alone
    and moved to the device once, on the output of `pipeline.dann_group` captured by a forward hook."""
    group = dann_group(ctx.student.group_names, ctx.pipeline.dann_group)
    shape = group_output_shapes(ctx.student, ctx.image_shape)[group]
    if shape is None or len(shape) not in (1, 2, 3):
        raise InvalidChoice(f"layer term dann cannot read group '{group}': its output has shape {shape} (need (C, H, "
                            f"W), (tokens, F) or (F,)); set pipeline.dann_group")
    with seeded_init(derive_seed(ctx.seed, "dann", ctx.stage)):
        classifier = DomainClassifier(shape)
    classifier = classifier.to(ctx.device)
    state: dict = {"coeff": 0.0, "is_target": None, "layout": None, "counts": None}
    outputs: dict = {}  # the group's output of the last forward pass, put there by a hook

    def on_step(step: StepInfo) -> None:
        state["coeff"] = reversal_coefficient(step.progress)
        if step.domains != state["layout"]:  # the layout is the same almost every step: build its labels once
            state["layout"] = step.domains
            state["is_target"] = torch.cat([torch.full((n,), d == "target", dtype=torch.bool)
                                            for d, n in step.domains]).to(ctx.device)
            n_target = sum(n for d, n in step.domains if d == "target")
            state["counts"] = (sum(n for _, n in step.domains) - n_target, n_target)

    def term() -> torch.Tensor:
        features = reverse_gradient(outputs[group].float(), state["coeff"])
        return domain_loss(classifier(features), state["is_target"], state["counts"])

    handles = hook_group_outputs(ctx.student, [group], outputs)  # the group's output, whatever the network

    def close() -> None:
        for h in handles:
            h.remove()

    return LayerTerm(term=term, params=list(classifier.parameters()), close=close, on_step=on_step)
