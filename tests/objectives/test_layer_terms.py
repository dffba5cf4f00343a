"""The layer-term registry (`pipeline.layer_term`): a term registered here, in the test file only, is accepted by
the settings and runs in every distilling stage with its own parameters trained and its hooks removed after; an
unknown name is a clear error before any training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import UserError
from objectives.layer_terms import (
    LayerTerm,
    LayerTermContext,
    get_layer_term,
    layer_term_choices,
    list_layer_terms,
    register_layer_term,
    unregister_layer_term,
)
from objectives.pipeline import run_trial
from objectives.settings import ModelSettings, PipelineSettings, TrialChoices
from study.config.validation import validate

LAYERS = {"stem": "freeze", "block1": "finetune", "block2": "finetune", "head": "finetune"}


@pytest.fixture
def logits_l1():
    """Registers `logits_l1` for one test: mean |z_s + shift - z_t| between the student's and the stage teacher's
    logits (captured by forward hooks), with a learned scalar `shift` as the term's own parameter. Yields what each
    build saw: (stage, context, shift)."""
    built: list[tuple[str, LayerTermContext, torch.nn.Parameter]] = []

    @register_layer_term("logits_l1")
    def build(ctx: LayerTermContext) -> LayerTerm:
        shift = torch.nn.Parameter(torch.zeros((), device=ctx.device))
        out = {}
        handles = [ctx.student.register_forward_hook(lambda m, i, o: out.__setitem__("s", o)),
                   ctx.teacher.register_forward_hook(lambda m, i, o: out.__setitem__("t", o))]
        built.append((ctx.stage, ctx, shift))
        return LayerTerm(term=lambda: (out["s"].float() + shift - out["t"].float()).abs().mean(), params=[shift],
                         close=lambda: [h.remove() for h in handles])

    yield built
    unregister_layer_term("logits_l1")


def test_a_registered_term_is_a_valid_setting_until_unregistered(logits_l1):
    assert layer_term_choices() == ["none", "feature", "params", "dann", "logits_l1"] == ["none", *list_layer_terms()]
    assert validate(PipelineSettings, {"layer_term": "logits_l1"}, "pipeline").layer_term == "logits_l1"
    unregister_layer_term("logits_l1")
    with pytest.raises(UserError, match="^pipeline.layer_term: 'logits_l1' is not one of none, feature, params, dann$"):
        validate(PipelineSettings, {"layer_term": "logits_l1"}, "pipeline")


def test_a_registered_term_runs_in_every_distilling_stage(logits_l1, tiny_pipeline, tiny_task):
    terms = {}
    pipeline = dataclasses.replace(tiny_pipeline, layer_term="logits_l1")
    result = run_trial(tiny_task(), ModelSettings(), pipeline,
                       TrialChoices(layers=LAYERS, beta=0.5, generations=1, threshold=1.0),
                       on_epoch=lambda stage, step, m: terms.__setitem__(stage, m.get("layer_term")))
    assert [stage for stage, _, _ in logits_l1] == ["distill", "retrain-1"]  # built per stage, never for finetune
    assert terms["finetune"] is None and terms["distill"] > 0 and terms["retrain-1"] > 0
    for _, ctx, shift in logits_l1:
        assert ctx.trained == ["block1", "block2", "head"]
        assert ctx.source_teacher is result.models["teacher"]
        assert shift.item() != 0  # the term's own parameter was trained with the student
    assert all(not m._forward_hooks for model in result.models.values() for m in model.modules())  # closed


def test_beta_zero_builds_no_term(logits_l1, tiny_pipeline, tiny_task):
    run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, layer_term="logits_l1"),
              TrialChoices(layers=LAYERS, beta=0.0, generations=0))
    assert logits_l1 == []


def test_an_unknown_term_names_the_registered_ones():
    with pytest.raises(UserError, match=r"unknown layer term 'featur' \(did you mean 'feature'\?\); "
                                        r"choose from: dann, feature, params"):
        get_layer_term("featur")


def test_an_unknown_term_fails_before_any_training(tiny_pipeline, tiny_task):
    trained = []
    # The trial's own term: PipelineSettings cannot hold an unknown one (it is checked when they are built).
    with pytest.raises(UserError, match="unknown layer term 'nope'"):
        run_trial(tiny_task(), ModelSettings(), tiny_pipeline, TrialChoices(layers=LAYERS, beta=0.5, layer_term="nope"),
                  on_epoch=lambda *a: trained.append(a))
    assert trained == []


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="layer term 'feature' is already registered"):
        register_layer_term("feature")(lambda ctx: LayerTerm(term=lambda: torch.zeros(())))
    assert get_layer_term("feature").__name__ == "feature_mse"
