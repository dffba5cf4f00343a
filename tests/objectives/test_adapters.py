"""The `adapt` action: a frozen group with a zero-initialised residual adapter after it. The student starts equal
to the teacher, the teacher's weights (BatchNorm statistics included) stay bit-identical however long it trains,
the adapter itself does train, and its parameters are in the layer map and the parameter counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from models import create_model
from models.adapters import AdaptedGroup, ResidualAdapter, add_adapters
from models.imports import allow_imports
from objectives.checkpoints import StageCheckpoints
from objectives.pipeline import run_trial
from objectives.settings import ModelSettings, TrialChoices
from objectives.student import build_student, frozen_groups, trainable_parameters
from objectives.train import set_train_mode

ADAPT_ALL = {"stem": "adapt", "block1": "adapt", "block2": "adapt", "head": "adapt"}


@pytest.mark.parametrize("rank", [2, 64])  # a low-rank bottleneck, and a full map on every group (rank >= width)
def test_the_adapted_student_starts_equal_to_the_teacher(rank):
    teacher = create_model("digitnet", 10, 1).eval()
    student, layer_map = build_student(teacher, ADAPT_ALL, "reinit", 0.5, None, (1, 8, 8), init_seed=3,
                                       adapter_rank=rank)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(x)
        assert torch.equal(student.eval()(x), want)
        # In train mode too: the adapted groups stay in eval mode, so their BatchNorm uses the teacher's statistics.
        assert torch.equal(student.train()(x), want)
    assert all(not g.group.training for g in student.groups.values())
    kinds = {g: (m["adapter"]["kind"], m["adapter"]["channels"], m["adapter"]["rank"]) for g, m in layer_map.items()}
    assert kinds == {"stem": ("conv", 12, min(rank, 12)), "block1": ("conv", 24, min(rank, 24)),
                     "block2": ("conv", 48, min(rank, 48)), "head": ("linear", 10, min(rank, 10))}
    # Only the adapters train.
    adapters = [p for g in student.groups.values() for p in g.adapter.parameters()]
    assert [id(p) for p in trainable_parameters(student, layer_map)] == [id(p) for p in adapters]


def test_adapters_are_drawn_from_their_seed_alone():
    teacher = create_model("digitnet", 10, 1)
    a, _ = build_student(teacher, ADAPT_ALL, "reinit", 0.5, None, (1, 8, 8), init_seed=1, adapter_rank=4)
    torch.rand(100)  # whatever else the process draws in between
    b, _ = build_student(teacher, ADAPT_ALL, "reinit", 0.5, None, (1, 8, 8), init_seed=1, adapter_rank=4)
    c, _ = build_student(teacher, ADAPT_ALL, "reinit", 0.5, None, (1, 8, 8), init_seed=2, adapter_rank=4)
    down = lambda m: m.groups["block1"].adapter.down.weight  # noqa: E731 - the randomly drawn half
    assert torch.equal(down(a), down(b)) and not torch.equal(down(a), down(c))


def test_adapt_trains_the_adapters_and_leaves_the_teacher_bit_identical(tiny_pipeline, tiny_task):
    acts = {"stem": "finetune", "block1": "adapt", "block2": "adapt", "head": "adapt"}
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                       TrialChoices(layers=acts, beta=0.5, layer_term="feature", generations=1, adapter_rank=4,
                                    threshold=1.0, augment=True))
    teacher = result.models["teacher"]
    for stage in ("finetune", "distill", "retrain-1"):
        model = result.models[stage]
        for g in ("block1", "block2", "head"):
            group = model.groups[g]
            assert isinstance(group, AdaptedGroup)
            want, got = teacher.groups[g].state_dict(), group.group.state_dict()
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want), (stage, g)  # running statistics included
            assert not any(p.requires_grad for p in group.group.parameters())
            # The adapter did train: its zero-initialised update moved (an untrained adapter fails here).
            assert group.adapter.up.weight.abs().sum() > 0, (stage, g)
        assert not torch.equal(model.groups["stem"][0].weight, teacher.groups["stem"][0].weight)


def test_the_layer_map_and_parameter_counts_include_the_adapter(tiny_pipeline, tiny_task):
    acts = {"stem": "freeze", "block1": "adapt", "block2": "finetune", "head": "adapt"}
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                       TrialChoices(layers=acts, generations=0, adapter_rank=8))
    block1, head = result.layer_map["block1"]["adapter"], result.layer_map["head"]["adapter"]
    assert block1 == {"kind": "conv", "channels": 24, "rank": 8, "params": 24 * 8 + 8 * 24 + 24}
    assert head == {"kind": "linear", "channels": 10, "rank": 8, "params": 10 * 8 + 8 * 10 + 10}
    adapters = block1["params"] + head["params"]
    assert result.student_params == result.teacher_params + adapters
    block2 = sum(p.numel() for p in result.models["teacher"].groups["block2"].parameters())
    assert result.trainable_params == block2 + adapters
    # The head keeps the task's classes: its adapter is a residual on the logits.
    assert result.student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # A saved adapted student reloads into a fresh model given the layer map's adapters.
    empty = add_adapters(create_model("digitnet", 10, 1),
                         {g: m["adapter"] for g, m in result.layer_map.items() if "adapter" in m})
    empty.load_state_dict(result.student.state_dict())


def test_an_adapted_trial_resumes_from_its_checkpoints(tiny_pipeline, tiny_task, tmp_path: Path):
    acts = {"stem": "finetune", "block1": "adapt", "block2": "replace", "head": "adapt"}
    pipeline = dataclasses.replace(tiny_pipeline, select="last")
    trial = TrialChoices(layers=acts, generations=1, adapter_rank=2)
    first = run_trial(tiny_task(), ModelSettings(), pipeline, trial, checkpoints=StageCheckpoints(tmp_path / "c"))
    again = run_trial(tiny_task(), ModelSettings(), pipeline, trial, checkpoints=StageCheckpoints(tmp_path / "c"))
    assert again.model_hash == first.model_hash and again.value == first.value


def test_a_residual_adapter_is_zero_and_keeps_its_shape():
    a = ResidualAdapter("conv", 6, 3)
    y = torch.randn(2, 6, 4, 4)
    assert torch.equal(a(y), y) and a.spec() == {"kind": "conv", "channels": 6, "rank": 3}
    with pytest.raises(ValueError, match="conv or linear"):
        ResidualAdapter("attention", 6, 3)


OWN_GROUPS = {"stem": ["conv1", "bn1"], "block1": ["block1"], "block2": ["block2"], "head": ["classifier"]}


def test_adapt_on_a_network_grouped_by_module_names():
    """A user network keeps its own forward: the adapter wraps the group's last module to run (the stem's bn1, not
    its conv1), the whole adapted group stays in eval mode, and a saved student is rebuilt from the layer map."""
    allow_imports({"examples"})  # examples/own_model.py is a user's module (conftest.py takes the opt-in back)
    teacher = create_model("examples.own_model:build", 10, 1, groups=OWN_GROUPS).eval()
    layers = {"stem": "adapt", "block1": "freeze", "block2": "adapt", "head": "finetune"}
    student, layer_map = build_student(teacher, layers, "reinit", 0.5, None, (1, 8, 8), init_seed=3, adapter_rank=4)
    assert layer_map["stem"]["adapter"]["after"] == "bn1" and layer_map["block2"]["adapter"]["after"] == "block2"
    assert isinstance(student.net.bn1, AdaptedGroup) and not isinstance(student.net.conv1, AdaptedGroup)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    set_train_mode(student, frozen_groups(layer_map))
    assert not student.net.conv1.training and not student.net.bn1.group.training  # no BatchNorm statistic moves
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))
    trained = {id(p) for p in trainable_parameters(student, layer_map)}
    adapters = [*student.net.bn1.adapter.parameters(), *student.net.block2.adapter.parameters()]
    assert {id(p) for p in adapters} <= trained
    assert not any(id(p) in trained for p in [*student.net.conv1.parameters(), *student.net.block1.parameters()])
    with torch.no_grad():  # move the adapters, then rebuild the student from its layer map and weights
        for p in adapters:
            p.add_(0.1)
    specs = {g: m["adapter"] for g, m in layer_map.items() if m["action"] == "adapt"}
    rebuilt = add_adapters(create_model("examples.own_model:build", 10, 1, groups=OWN_GROUPS), specs)
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), student.eval()(x))
