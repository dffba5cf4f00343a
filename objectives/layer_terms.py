"""Beta's term (`search.layer_term`, default `pipeline.layer_term`): a loss on the student's layers, added as
`beta * term` in distilling stages.

Terms are registered by name; adding one is one decorated builder here (or in any imported module), with no edit
elsewhere: `search.layer_term` and `pipeline.layer_term` accept every registered name.

    @register_layer_term("name")
    def name(ctx: LayerTermContext) -> LayerTerm: ...

A builder runs once per distilling stage (only when beta > 0), after the student and the stage's frozen teacher
exist and before the first step; its `on_step(StepInfo)` (when given) before every training forward pass, with the
batch's rows by domain and the stage's progress; its `term()` after every training forward pass, and `close()` once
the stage ends (also when it fails), so hooks never outlive their stage. A registration may also say that the term
uses the unlabelled target pool (`uses_target_pool`: the pool is then trained on even without KD) and give a
`check(LayerTermPlan)` that rejects, before any training, choices with which the term could not work.

`none` is no term at all (never registered): the value of `search.layer_term` that turns beta's term off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models import GroupedModel, derive_seed, group_output_shapes, seeded_init
from models.grouped import hook_group_outputs, in_prefixes
from models.named import Registry

from .params import NO_TERM
from .settings import PipelineSettings
from .train import DataSource, StepInfo


@dataclass
class LayerTermContext:
    """What a layer term may build itself from, for one distilling stage."""

    student: GroupedModel  # the stage's student, trained in place
    teacher: GroupedModel  # the stage's frozen teacher: the source teacher, the finetuned student or generation g - 1
    source_teacher: GroupedModel  # the source-trained teacher, never trained by the trial (L2-SP's starting point)
    layer_map: dict  # group -> {action, weights, width}, as `objectives.student.build_student` made it
    image_shape: tuple[int, ...]  # (C, H, W) of one input
    device: torch.device
    seed: int  # the trial's run seed: derive a seed per use with `models.derive_seed(seed, "what", stage)`
    stage: str  # the stage's name: distill | retrain-<g>
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)  # a term's own settings (`dann_group`)

    @property
    def trained(self) -> list[str]:
        """The groups the stage trains (action finetune, replace or adapt), input to output."""
        return [g for g, m in self.layer_map.items() if m["action"] != "freeze"]


@dataclass(frozen=True)
class LayerTermPlan:
    """What a term's `check` sees before any training: the student's layer map, the pipeline's settings and the
    data sources of every distilling stage (stage -> sources with data and weight)."""

    layer_map: dict
    pipeline: PipelineSettings
    stage_sources: dict[str, list[DataSource]]


@dataclass
class LayerTerm:
    """One stage's layer term: `term()` gives the scalar loss after a forward pass; `params` are extra trainable
    parameters the stage's optimizer trains with the student (adapters); `close()` releases what it holds."""

    term: Callable[[], torch.Tensor]
    params: list[nn.Parameter] = field(default_factory=list)
    close: Callable[[], None] = lambda: None
    on_step: Callable[[StepInfo], None] | None = None  # told each step's batch layout and progress, before forward


@dataclass(frozen=True)
class TermOptions:
    """How a registered term is run: `uses_target_pool` trains on the unlabelled target pool even at alpha 0;
    `check(LayerTermPlan)` raises `models.InvalidChoice` for choices the term cannot work with."""

    uses_target_pool: bool = False
    check: Callable[[LayerTermPlan], None] | None = None


LayerTermBuilder = Callable[[LayerTermContext], LayerTerm]
# Built-in terms outside this module (`objectives.dann`) register when the package is imported (its __init__).
_TERMS: Registry[LayerTermBuilder] = Registry("layer term")
_OPTIONS: dict[str, TermOptions] = {}


def register_layer_term(name: str, uses_target_pool: bool = False,
                        check: Callable[[LayerTermPlan], None] | None = None
                        ) -> Callable[[LayerTermBuilder], LayerTermBuilder]:
    """Decorator: register a builder `(LayerTermContext) -> LayerTerm` as `search.layer_term` / `pipeline.layer_term`
    `<name>`, with its `TermOptions`.

    Example:
        >>> @register_layer_term("logits_l1")
        ... def logits_l1(ctx):
        ...     return LayerTerm(lambda: torch.zeros(()))
        >>> "logits_l1" in list_layer_terms()
        True
        >>> unregister_layer_term("logits_l1")
    """
    if name == NO_TERM:
        raise ValueError(f"layer term '{NO_TERM}' means no term and cannot be registered")

    def add(builder: LayerTermBuilder) -> LayerTermBuilder:
        _TERMS.add(name, builder)
        _OPTIONS[name] = TermOptions(uses_target_pool, check)
        return builder

    return add


# The builder registered as a name (else a UserError naming the registered ones); the names in registration order.
get_layer_term, list_layer_terms = _TERMS.get, _TERMS.names


def unregister_layer_term(name: str) -> None:
    """Remove a registered term (for tests that register their own)."""
    _TERMS.remove(name)
    _OPTIONS.pop(name, None)


def layer_term_options(name: str) -> TermOptions:
    """The options a term was registered with (`none` has the defaults)."""
    if name != NO_TERM:
        get_layer_term(name)  # a UserError naming the registered terms
    return _OPTIONS.get(name, TermOptions())


def layer_term_choices() -> list[str]:
    """Every value `search.layer_term` and `pipeline.layer_term` accept: `none`, then the registered terms."""
    return [NO_TERM, *list_layer_terms()]


# ---- feature: FitNets-style feature matching --------------------------------------------------------------------
@register_layer_term("feature")
def feature_mse(ctx: LayerTermContext) -> LayerTerm:
    """Feature distillation (FitNets, Romero et al., 2015), over the stage's trained groups G:

        term = 1/|G| * sum_{g in G} MSE(pool(A_g(s_g)), t_g)

    with s_g, t_g the student's and the frozen teacher's outputs of group g (captured by forward hooks), A_g a
    learned 1x1 adapter where their channel counts differ (identity elsewhere) and pool an adaptive average pool
    where their spatial sizes differ. The adapters are initialised from the run seed and the stage alone."""
    with seeded_init(derive_seed(ctx.seed, "adapters", ctx.stage)):
        adapters = make_adapters(group_output_shapes(ctx.student, ctx.image_shape),
                                 group_output_shapes(ctx.teacher, ctx.image_shape), ctx.trained)
    adapters = adapters.to(ctx.device)
    term, remove_hooks = feature_term(ctx.student, ctx.teacher, ctx.trained, adapters)
    return LayerTerm(term=term, params=list(adapters.parameters()), close=remove_hooks)


def feature_term(student: nn.Module, teacher: nn.Module, groups: list[str],
                 adapters: nn.ModuleDict) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """The `feature` term's computation (see `feature_mse`): hooks on `groups` of both models capture their outputs
    on every forward pass, so no model code changes. Returns (term, remove_hooks)."""
    captured: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    handles = hook_group_outputs(student, groups, captured["s"]) + hook_group_outputs(teacher, groups, captured["t"])

    def term() -> torch.Tensor:
        total = 0.0
        for g in groups:
            if not torch.is_tensor(captured["s"].get(g)):  # a group of bare parameters gives no output
                continue
            s, t = captured["s"][g].float(), captured["t"][g].float().detach()
            if g in adapters:
                s = adapters[g](s)
            if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            total = total + F.mse_loss(s, t)
        return total / max(1, len(groups))

    def remove() -> None:
        for h in handles:
            h.remove()

    return term, remove


def make_adapters(student_shapes: dict, teacher_shapes: dict, groups: list[str]) -> nn.ModuleDict:
    """1x1 conv (or linear) adapters for groups whose student and teacher channel counts differ."""
    adapters = nn.ModuleDict()
    for g in groups:
        s, t = student_shapes[g], teacher_shapes[g]
        if s is not None and t is not None and s[0] != t[0]:
            adapters[g] = nn.Conv2d(s[0], t[0], 1) if len(s) == 3 else nn.Linear(s[0], t[0])
    return adapters


# ---- params: L2-SP ----------------------------------------------------------------------------------------------
@register_layer_term("params")
def l2sp(ctx: LayerTermContext) -> LayerTerm:
    """L2-SP (Li, Grandvalet & Davoine, 2018): the squared L2 distance of the trainable inherited weights to their
    source-trained values w0 (the source teacher's, see `l2sp_anchors`), whatever teacher the stage distils from:

        term = sum_{w in W} ||w - w0||^2"""
    anchors = l2sp_anchors(ctx.source_teacher, ctx.layer_map)
    return LayerTerm(term=lambda: params_l2(ctx.student, anchors))


def l2sp_anchors(teacher: nn.Module, layer_map: dict) -> dict[str, torch.Tensor]:
    """L2-SP's starting point: the teacher's source-trained weights of the groups the student inherits and trains
    (action finetune), under the student's parameter names. Replaced groups have no source weights to stay near;
    frozen ones cannot move."""
    inherited = [p for g, m in layer_map.items() if m["action"] == "finetune" for p in teacher.group_prefixes(g)]
    return {n: p.detach().clone() for n, p in teacher.named_parameters() if in_prefixes(n, inherited)}


def params_l2(model: nn.Module, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance of trainable weights to their starting values, sum_n ||p_n - start_n||^2 (only
    parameters present in `start`, i.e. those inherited from the teacher)."""
    terms = [((p - start[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in start]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=next(model.parameters()).device)
