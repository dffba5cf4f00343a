"""Your own model and data end to end through the real CLI: a builder and a dataset function in a file outside the
package (a study whose report names the file's groups), the worked example of examples/own_model.py, a
torchvision network on an image folder, and one-line errors for bad groups and bad datasets, before any study is
created."""

from __future__ import annotations

import json
import sys
import textwrap

import optuna
import pytest
from click.testing import CliRunner

from cli import main
from models.imports import allow_imports
from objectives.tasks import TaskOptions, load_task

MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mixer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.classifier(self.mixer(self.features(x)).mean(dim=(2, 3)))


def build(num_classes, in_channels):
    return Net(num_classes, in_channels)


def halves(n=40, seed=0):
    """class 0 lit on the left half, class 1 on the right; the target is the same, inverted."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    for i in range(n):
        x[i, :, :, 4 * int(y[i]):4 * int(y[i]) + 4] += 0.6
    return x.clamp(0, 1), y


def data():
    x, y = halves()
    tx, ty = halves(seed=1)
    return TensorDataset(x, y), TensorDataset(1 - tx, ty), TensorDataset(1 - halves(seed=2)[0])


def wrong():
    return [1, 2, 3, 4]


def strings():
    return ["a", "b"], ["c", "d"]
'''
GROUPS = {"early": ["features"], "late": ["mixer"], "out": ["classifier"]}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and fragment in line, result.stderr


@pytest.fixture
def workdir(tmp_path, monkeypatch, teacher_cache_dir):
    """A working directory outside the package holding the user's module and a tiny study config."""
    name = f"user_code_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working directory is added on import: undo it after
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)
    # The opt-in for the user's package: the variable for the commands, allow_imports for direct calls.
    monkeypatch.setenv("DISTILLSTUDY_ALLOW_IMPORTS", name)
    allow_imports({name})
    config = {
        "task": {"name": f"{name}:data", "target_labeled_per_class": 2},
        "model": {"arch": f"{name}:build", "groups": GROUPS},
        "pipeline": {"device": "cpu", "cpu_threads": 1, "batch_size": 16, "teacher_epochs": 2, "finetune_epochs": 1,
                     "distill_epochs": 1, "retrain_epochs": 1, "cache_dir": teacher_cache_dir},
        "search": {"generations": [0]},
        "study": {"name": "own", "storage": f"sqlite:///{tmp_path / 's.db'}", "n_trials": 4,
                  "checkpoint_dir": str(tmp_path / "ck"), "confirm": {"top": 0}},
        "tracking": {"enabled": False},
    }
    (tmp_path / "own.yaml").write_text(json.dumps(config))  # JSON is YAML
    yield {"module": name, "path": tmp_path, "storage": config["study"]["storage"]}
    sys.modules.pop(name, None)


def test_study_on_a_user_module_reports_its_groups(workdir):
    assert cli("study", "create", "own.yaml").exit_code == 0
    result = cli("study", "run", "own", "--storage", workdir["storage"])
    assert result.exit_code == 0, result.output
    report = cli("study", "report", "own", "--storage", workdir["storage"], "--format", "json",
                 "--out", workdir["path"] / "report")
    assert report.exit_code == 0, report.output
    data = json.loads((workdir["path"] / "report" / "report.json").read_text())
    assert list(data["groups"]) == ["early", "late", "out"]
    study = optuna.load_study(study_name="own", storage=workdir["storage"])
    assert {k for t in study.trials for k in t.params if k.startswith("layers.")} == \
        {"layers.early", "layers.late", "layers.out"}


def test_user_task_is_split_with_its_unlabelled_set(workdir):
    task = load_task(TaskOptions(name=f"{workdir['module']}:data", target_labeled_per_class=2), seed=0)
    assert task.num_classes == 2 and task.image_shape == (1, 8, 8)
    sizes = task.sizes()
    assert sizes["target_labeled"] == 4
    # The split's unlabelled pool (target train less the labelled subset) plus the 40 images of the third set.
    assert sizes["target_unlabeled"] == (40 - sizes["target_val"] - sizes["target_test"] - 4) + 40
    assert (task.target_unlabeled.y == -1).sum() == 40
    again = load_task(TaskOptions(name=f"{workdir['module']}:data", target_labeled_per_class=2), seed=0)
    assert again.fingerprint == task.fingerprint


def test_bad_groups_and_datasets_are_one_line_errors_before_any_study(workdir):
    module = workdir["module"]
    assert_one_line_error(cli("study", "create", "own.yaml", "--set", "model.groups.early=[features.0]"),
                          "module 'features.1' of")
    assert_one_line_error(cli("study", "create", "own.yaml", "--set", "model.groups.out=[classifier, mixer]"),
                          "is in more than one layer group")
    assert optuna.get_all_study_names(workdir["storage"]) == []
    assert_one_line_error(cli("trial", "run", "--config", "own.yaml", "--set",
                              "model.groups={out: [classifier], early: [features], late: [mixer]}"),
                          "its last layer group 'late' gives shape (8, 8, 8), not the task's 2 class logits")
    assert_one_line_error(cli("trial", "run", "--config", "own.yaml", "--set", f"task.name={module}:wrong"),
                          "must return (source, target) or (source, target, unlabeled) datasets, got a list of 4")
    assert_one_line_error(cli("trial", "run", "--config", "own.yaml", "--set", f"task.name={module}:strings"),
                          "the source dataset: item 0 is str, expected (image tensor, label)")
    assert_one_line_error(cli("trial", "run", "--config", "own.yaml", "--set", f"task.name={module}:nothing"),
                          f"task.name: module '{module}' has no function 'nothing'")


def test_worked_example_runs(repo_root, monkeypatch, teacher_cache_dir):
    monkeypatch.chdir(repo_root)
    sets = ["pipeline.device=cpu", "pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1",
            "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1", "search.generations=1",
            "search.layers.block2=replace", "pipeline.replace_with=slim", f"pipeline.cache_dir={teacher_cache_dir}"]
    result = cli("trial", "run", "--config", "examples/own_model.yaml", "--json", "--allow-import", "examples",
                 *(a for s in sets for a in ("--set", s)))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out["layer_map"]) == ["stem", "block1", "block2", "head"]
    assert out["layer_map"]["block2"]["weights"] == "slim x0.5"
    assert out["student_params"] < out["teacher_params"]


def test_torchvision_resnet18_on_an_image_folder(tmp_path, monkeypatch, teacher_cache_dir):
    from test_tasks_folder import write_domain

    write_domain(tmp_path / "src", "RGB", (20, 14), seed=0, per_class=6)
    write_domain(tmp_path / "tgt", "L", (24, 24), seed=1, per_class=6)
    sets = ["model.arch=torchvision:resnet18", "task.name=imagefolder", f"task.source_dir={tmp_path / 'src'}",
            f"task.target_dir={tmp_path / 'tgt'}", "task.image_size=16", "task.target_labeled_per_class=1",
            "pipeline.device=cpu", "pipeline.batch_size=4", "pipeline.num_workers=0", "pipeline.teacher_epochs=1",
            "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1",
            "search.layers.layer4=replace", f"pipeline.cache_dir={teacher_cache_dir}"]
    result = cli("trial", "run", "--json", *(a for s in sets for a in ("--set", s)))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out["layer_map"]) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert out["layer_map"]["layer4"] == {"action": "replace", "weights": "reinit", "width": 1.0}


def test_user_network_frozen_group_stays_bit_identical_and_others_learn(workdir, tiny_pipeline):
    """The actions on a network grouped by module names: the frozen group's weights and BatchNorm statistics are
    the teacher's in every stage (also with the feature term's hooks and L2-SP's anchors), trained ones move."""
    import dataclasses

    import torch

    from objectives.layer_terms import l2sp_anchors
    from objectives.pipeline import run_trial
    from objectives.settings import ModelSettings, TrialChoices

    module = workdir["module"]
    model = ModelSettings(arch=f"{module}:build", groups=GROUPS)
    pipeline = dataclasses.replace(tiny_pipeline, batch_size=16)
    layers = {"early": "freeze", "late": "replace", "out": "finetune"}
    for term in ("feature", "params"):
        result = run_trial(TaskOptions(name=f"{module}:data", target_labeled_per_class=2), model,
                           dataclasses.replace(pipeline, layer_term=term),
                           TrialChoices(layers=layers, beta=0.5, generations=1, alpha=0.5))
        teacher = result.models["teacher"]
        frozen = teacher.group_module("early").state_dict()
        assert any("running_mean" in k for k in frozen)  # the BatchNorm statistics are compared too
        for stage in ("finetune", "distill", "retrain-1"):
            student = result.models[stage]
            got = student.group_module("early").state_dict()
            assert all(torch.equal(frozen[k], got[k]) for k in frozen), (term, stage)
            assert not torch.equal(student.net.classifier.weight, teacher.net.classifier.weight)
            assert not torch.equal(student.net.mixer[0].weight, teacher.net.mixer[0].weight)
    anchors = l2sp_anchors(teacher, result.layer_map)
    assert sorted(anchors) == ["net.classifier.bias", "net.classifier.weight"]  # only the fine-tuned group's


def test_checkpoint_teacher_of_the_bare_user_network(workdir):
    """model.teacher: checkpoint takes a state_dict saved from the user's own network (no wrapper prefix)."""
    import torch

    from models.imports import load_callable

    net = load_callable(f"{workdir['module']}:build", "model.arch")(2, 1)
    torch.save(net.state_dict(), workdir["path"] / "mine.pt")
    result = cli("trial", "run", "--config", "own.yaml", "--json", "--set", "model.teacher=checkpoint",
                 "--set", f"model.checkpoint={workdir['path'] / 'mine.pt'}")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stages"]["teacher"]["epochs"] == 0  # used as given, not trained
