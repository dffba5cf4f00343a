"""The replacement-strategy registry (`pipeline.replace_with`): a strategy registered here, in the test file only,
is accepted by the settings, builds the replaced group (under the group's own seed), and gets a donor model exactly
when it is registered with `needs_donor`; an unknown name is a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import UserError, create_model
from objectives.pipeline import run_trial
from objectives.replacements import (
    GroupToReplace,
    get_replacement,
    list_replacements,
    register_replacement,
    unregister_replacement,
)
from objectives.settings import ModelSettings, PipelineSettings, TrialChoices
from objectives.student import build_student
from study.config.validation import validate

LAYERS = {"stem": "finetune", "block1": "finetune", "block2": "replace", "head": "finetune"}


@pytest.fixture
def zeros():
    """Registers `zeros` for one test: the group rebuilt at the teacher's width with every weight zero, and
    `donor_fresh` (needs_donor): a fresh group at the donor's width. Yields the (strategy, group) of each call."""
    calls: list[tuple[str, GroupToReplace]] = []

    @register_replacement("zeros")
    def zeros(ctx: GroupToReplace):
        calls.append(("zeros", ctx))
        width = ctx.teacher.group_widths[ctx.group]
        module = ctx.teacher.new_group(ctx.group, width)
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
        return module, width, "zeros"

    @register_replacement("donor_fresh", needs_donor=True)
    def donor_fresh(ctx: GroupToReplace):
        calls.append(("donor_fresh", ctx))
        width = ctx.donor.group_widths[ctx.group]
        return ctx.donor.new_group(ctx.group, width), width, f"fresh x{width:g}"

    yield calls
    unregister_replacement("zeros")
    unregister_replacement("donor_fresh")


def test_registered_strategies_are_valid_settings_until_unregistered(zeros):
    assert list_replacements() == ["reinit", "slim", "donor", "zeros", "donor_fresh"]
    assert validate(PipelineSettings, {"replace_with": "zeros"}, "pipeline").replace_with == "zeros"
    unregister_replacement("zeros")
    assert validate(PipelineSettings, {"replace_with": "donor_fresh"}, "pipeline").replace_with == "donor_fresh"
    with pytest.raises(UserError, match="^pipeline.replace_with: 'zeros' is not one of reinit, slim, donor, donor_"):
        validate(PipelineSettings, {"replace_with": "zeros"}, "pipeline")


def test_the_replaced_group_is_built_by_the_registered_strategy(zeros):
    teacher = create_model("digitnet", num_classes=10, in_channels=1)
    student, layer_map = build_student(teacher, LAYERS, "zeros", 0.5, None, (1, 8, 8), init_seed=0)
    assert [(name, ctx.group) for name, ctx in zeros] == [("zeros", "block2")]
    assert layer_map["block2"] == {"action": "replace", "weights": "zeros", "width": 1.0}
    assert all((p == 0).all() for p in student.groups["block2"].parameters())
    assert all(torch.equal(p, q) for p, q in zip(student.groups["head"].parameters(),
                                                  teacher.groups["head"].parameters()))  # the rest is the teacher's


def test_a_registered_strategy_runs_in_a_trial_and_gets_no_donor(zeros, tiny_pipeline, tiny_task):
    result = run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, replace_with="zeros"),
                       TrialChoices(layers=LAYERS, generations=0))
    assert result.layer_map["block2"]["weights"] == "zeros" and result.donor is None
    assert {name for name, _ in zeros} == {"zeros"} and all(ctx.donor is None for _, ctx in zeros)


def test_a_strategy_that_needs_a_donor_gets_one(zeros, tiny_pipeline, tiny_task):
    result = run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, replace_with="donor_fresh"),
                       TrialChoices(layers=LAYERS, generations=0))
    assert result.donor is not None and result.layer_map["block2"]["weights"] == "fresh x2"
    # With no group replaced no strategy runs, so no donor is trained or loaded.
    unreplaced = {g: "finetune" for g in LAYERS}
    result = run_trial(tiny_task(), ModelSettings(), dataclasses.replace(tiny_pipeline, replace_with="donor_fresh"),
                       TrialChoices(layers=unreplaced, generations=0))
    assert result.donor is None


def test_an_unknown_strategy_names_the_registered_ones():
    with pytest.raises(UserError, match=r"unknown replacement strategy 'slm' \(did you mean 'slim'\?\); "
                                        r"choose from: donor, reinit, slim"):
        get_replacement("slm")
    assert get_replacement("donor").needs_donor and not get_replacement("slim").needs_donor
