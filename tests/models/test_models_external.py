"""Any network grouped by module names (models/external.py, models/network.py, models/default_groups.py):
torchvision, timm and user builders, default groupings of the common families, one-line grouping errors, heads and
input channels shaped for the task, pretrained weights only from local caches."""

from __future__ import annotations

import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from models import InvalidChoice, UserError, create_model, group_output_shapes
from models.grouped import in_prefixes
from models.imports import ImportNotAllowed, allow_imports

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width=1.0):
        super().__init__()
        hidden = max(1, round(8 * width))
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 8, 1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(torch.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3)))


def build(num_classes, in_channels, width=1.0):
    return Net(num_classes, in_channels, width)


def fixed(num_classes, in_channels):
    return Net(num_classes, in_channels)


def not_a_module(num_classes, in_channels):
    return "a string"
'''
GROUPS = {"stem": ["conv1", "bn1"], "body": ["body"], "head": ["fc"]}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A builder module in a directory outside the package, which becomes the working directory."""
    name = f"user_net_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_callable adds the working directory: undo it after
    allow_imports({name})  # the opt-in for a user's package (conftest.py takes it back)
    yield name
    sys.modules.pop(name, None)


def _assert_partition(model):
    """Every parameter of the network in exactly one group."""
    names = [n for n, _ in model.named_parameters()]
    owners = {n: [g for g in model.group_names if in_prefixes(n, model.group_prefixes(g))] for n in names}
    assert all(len(o) == 1 for o in owners.values()), {n: o for n, o in owners.items() if len(o) != 1}
    counted = sum(p.numel() for g in model.group_names for p in model.group_module(g).parameters())
    assert counted == sum(p.numel() for p in model.parameters())


# Default groupings: built on the meta device (no memory, no initialisation cost), never run.
FAMILIES = {
    "torchvision:resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "torchvision:resnet50": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "torchvision:mobilenet_v3_small": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
    "torchvision:mobilenet_v2": ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "head"],
    "torchvision:efficientnet_b0": ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "head"],
    "torchvision:convnext_tiny": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
    "torchvision:vit_b_16": ["stem", "blocks1", "blocks2", "blocks3", "blocks4", "head"],
    "timm:resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "timm:mobilenetv3_small_100": ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "head"],
    "timm:efficientnet_b0": ["stem", *(f"stage{i}" for i in range(1, 8)), "head"],
    "timm:convnext_atto": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
    "timm:vit_tiny_patch16_224": ["stem", "blocks1", "blocks2", "blocks3", "blocks4", "head"],
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_default_groupings_cover_every_parameter_once(arch):
    with torch.device("meta"):
        model = create_model(arch, num_classes=7, in_channels=1)
    assert model.group_names == FAMILIES[arch]
    _assert_partition(model)
    head = model.group_module("head")
    assert [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features == 7  # re-shaped head
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1  # adapted to the task's channels


def test_torchvision_resnet18_student_mixes_groups():
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=3, in_channels=1)
    shapes = group_output_shapes(model, (1, 16, 16))
    assert shapes["head"] == (3,) and shapes["layer4"] == (512, 1, 1)
    fresh = model.new_group("layer2")
    before = model.net.layer2[0].conv1.weight.clone()
    model.replace_group("layer2", fresh)
    assert model.net.layer2 is fresh.part(0) and not torch.equal(model.net.layer2[0].conv1.weight, before)
    with pytest.raises(InvalidChoice, match="width"):  # torchvision builders have no width knob: no slim
        model.new_group("layer2", 0.5)


def test_user_builder_with_groups_slims_and_reloads(user_module):
    arch = f"{user_module}:build"
    model = create_model(arch, num_classes=4, in_channels=1, groups=GROUPS)
    assert model.group_names == ["stem", "body", "head"] and model.custom_groups == GROUPS
    _assert_partition(model)
    slim = model.new_group("body", 0.5)
    model.replace_group("body", slim, 0.5)
    assert model.net.body[0].out_channels == 4 and group_output_shapes(model, (1, 8, 8))["head"] == (4,)
    rebuilt = create_model(arch, 4, 1, group_widths=model.group_widths, groups=model.custom_groups)
    rebuilt.load_state_dict(model.state_dict())  # a saved slim student loads into a rebuilt one


def test_user_builder_default_groups_are_its_children(user_module):
    model = create_model(f"{user_module}:fixed", num_classes=4, in_channels=3)
    assert model.group_names == ["conv1", "bn1", "body", "fc"]
    with pytest.raises(InvalidChoice, match="width"):  # `fixed` takes no width: no slim replacement
        model.new_group("body", 0.5)


@pytest.mark.parametrize("groups, message", [
    ({"stem": ["conv1"], "body": ["body"], "head": ["fc"]}, "module 'bn1' of .* is in no layer group"),
    ({"stem": ["conv1", "bn1", "body.0"], "body": ["body"], "head": ["fc"]},
     r"module 'body.0' of .* is in more than one layer group \(stem, body\)"),
    ({"stem": ["conv1", "bn1"], "body": ["body", "conv9"], "head": ["fc"]}, "'conv9' is no module or parameter"),
    ({"stem": "conv1 bn1"}, "'conv1 bn1' is no module"),
    ({"stem": [1]}, "expected a list of module names"),
])
def test_grouping_errors_are_one_line_and_name_the_module(user_module, groups, message):
    with pytest.raises(UserError, match=message) as err:
        create_model(f"{user_module}:build", num_classes=4, in_channels=1, groups=groups)
    assert "\n" not in str(err.value)


def test_bad_builders_are_one_line_errors(user_module):
    for arch, message in [(f"{user_module}:not_a_module", "returned str, not a torch.nn.Module"),
                          (f"{user_module}:missing", f"module '{user_module}' has no function 'missing'"),
                          ("no_such_pkg.mod:build", "cannot import 'no_such_pkg.mod'"),
                          ("torchvision:resnet19", "did you mean 'resnet18'"),
                          ("timm:resnet19x", "unknown timm model")]:
        allow_imports({user_module, "no_such_pkg"})
        with pytest.raises(UserError, match=message) as err:
            create_model(arch, num_classes=4, in_channels=1)
        assert "\n" not in str(err.value)


def test_a_package_not_allowed_is_never_imported(user_module):
    allow_imports({"other"})
    with pytest.raises(ImportNotAllowed, match=f"'{user_module}:build' would import package '{user_module}'"):
        create_model(f"{user_module}:build", num_classes=4, in_channels=1)
    assert user_module not in sys.modules
    model = create_model("torchvision:resnet18", num_classes=4, in_channels=1)  # built-in names need no opt-in
    assert model.num_classes == 4


def test_timm_model_runs_with_its_default_groups():
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", num_classes=3, in_channels=1)
    assert model.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
    assert group_output_shapes(model, (1, 16, 16))["head"] == (3,)


def test_missing_timm_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where timm is not installed
    with pytest.raises(UserError) as err:
        create_model("timm:resnet18", num_classes=3, in_channels=1)
    assert str(err.value) == "timm:resnet18 needs timm, an optional extra: pip install 'distillstudy[timm]'"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches under tmp_path; no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("DISTILLSTUDY_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_pretrained_not_cached_offline_names_the_file(empty_caches):
    with pytest.raises(UserError) as err:
        create_model("torchvision:resnet18", num_classes=3, in_channels=1, pretrained=True)
    hub = empty_caches / "torch" / "hub" / "checkpoints"
    assert f"save it as {hub / 'resnet18-f37072fd.pth'}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        create_model("timm:resnet18", num_classes=3, in_channels=1, pretrained=True)
    assert str(err.value) == (
        "pretrained timm:resnet18 weights are not cached and DISTILLSTUDY_OFFLINE forbids downloading: download "
        "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors and save it as "
        f"{hub / 'timm--resnet18.a1_in1k.safetensors'}")


def test_pretrained_torchvision_loads_all_but_the_head_from_the_cache(empty_caches, monkeypatch):
    import torchvision

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().eval()
    path = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = create_model("torchvision:resnet18", num_classes=3, in_channels=1, pretrained=True)
    assert torch.equal(model.net.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.allclose(model.net.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))  # grey stem
    assert model.net.fc.weight.shape == (3, 512)


def test_pretrained_timm_loads_from_the_named_file(empty_caches):
    import timm
    from safetensors.torch import save_file

    from models.weights import timm_download_fix

    torch.manual_seed(2)
    reference = timm.create_model("test_resnet").eval()
    path = Path(timm_download_fix("test_resnet").rsplit(" save it as ", 1)[1])  # the file the message names
    path.parent.mkdir(parents=True)
    save_file(reference.state_dict(), str(path))
    model = create_model("timm:test_resnet", num_classes=3, in_channels=3, pretrained=True)
    assert torch.equal(model.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.net.fc.weight.shape[0] == 3


def test_actions_on_a_user_network_donor_slim_and_freeze(user_module):
    """build_student on a NetworkGroups teacher: a donor group from a 2x wider network, a slim one, a frozen one."""
    from objectives.student import build_student, trainable_parameters

    arch = f"{user_module}:build"
    teacher = create_model(arch, num_classes=4, in_channels=1, groups=GROUPS)
    donor = create_model(arch, num_classes=4, in_channels=1, groups=GROUPS, width=2.0)
    layers = {"stem": "freeze", "body": "replace", "head": "finetune"}
    student, layer_map = build_student(teacher, layers, "donor", 0.5, donor, (1, 8, 8), init_seed=0)
    assert layer_map["body"] == {"action": "replace", "weights": f"donor {arch} x2", "width": 2.0}
    assert student.net.body[0].out_channels == 16 and torch.equal(student.net.body[0].weight, donor.net.body[0].weight)
    assert student.net.body[0].weight is not donor.net.body[0].weight  # a copy: training it leaves the donor alone
    assert not any(p.requires_grad for p in student.group_module("stem").parameters())
    assert {id(p) for p in trainable_parameters(student, layer_map)} == \
        {id(p) for g in ("body", "head") for p in student.group_module(g).parameters()}
    slim, slim_map = build_student(teacher, layers, "slim", 0.5, None, (1, 8, 8), init_seed=0)
    assert slim_map["body"]["width"] == 0.5 and slim.net.body[0].out_channels == 4
    assert teacher.net.body[0].out_channels == 8  # the teacher is never changed
