"""torchvision architectures as GroupedModels (models/tv.py): groups, width scaling, reloading, pretrained weights.

Shape and parameter checks mostly run on the meta device (no memory, no compute); nothing here touches the network.
"""

import os
import urllib.error

import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

from models import UserError, create_model, group_output_shapes, group_parameter_counts

ARCHS = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "resnet34": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "resnet50": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "mobilenet_v3_small": ["stem", "stage1", "stage2", "stage3", "stage4", "head"],
}
# Groups with no hidden width (width leaves them unchanged); every other group must get strictly smaller.
NO_HIDDEN = {"stem", "head"}
NO_HIDDEN_BY_ARCH = {"resnet18": NO_HIDDEN, "resnet34": NO_HIDDEN, "resnet50": NO_HIDDEN,
                     "mobilenet_v3_small": {"stem"}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Inputs here are tiny: intra-op threads only add overhead, and much more when the CPUs are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_forwards(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=3).eval()
    assert model.group_names == ARCHS[arch]
    assert model.group_widths == {g: 1.0 for g in ARCHS[arch]}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):  # greyscale 28x28 input: the stem takes in_channels
        grey = create_model(arch, num_classes=7, in_channels=1)
    assert grey(torch.empty(2, 1, 28, 28, device="meta")).shape == (2, 7)


@pytest.mark.parametrize("arch", ARCHS)
def test_new_group_keeps_interface_and_scales_hidden_width(arch):
    # meta skips initialising the 2x-wide resnet groups; mobilenet's many small ops run faster on the CPU.
    device = "cpu" if arch == "mobilenet_v3_small" else "meta"
    with torch.device(device), torch.no_grad():
        model = create_model(arch, num_classes=10, in_channels=3)
        x = torch.zeros(2, 3, 32, 32)
        for name, base in model.groups.items():
            y = base(x)
            slim, wide = model.new_group(name, 0.5), model.new_group(name, 2.0)
            assert slim(x).shape == y.shape == wide(x).shape, name
            assert _params(slim) <= _params(base) <= _params(wide), name
            if name not in NO_HIDDEN_BY_ARCH[arch]:
                assert _params(slim) < _params(base) < _params(wide), name
            x = y


def test_resnet34_groups_drop_into_resnet18_but_resnet50_groups_do_not():
    with torch.device("meta"):
        r18, r34, r50 = (create_model(a, 10, in_channels=3) for a in ("resnet18", "resnet34", "resnet50"))
        expected = group_output_shapes(r18, (3, 32, 32))
        assert group_output_shapes(r34, (3, 32, 32)) == expected
        # Alternate the donors so both resnet18 -> resnet34 and resnet34 -> resnet18 junctions are exercised.
        for name in r18.group_names[::2]:
            r18.replace_group(name, r34.groups[name])
        assert group_output_shapes(r18, (3, 32, 32)) == expected
        assert group_output_shapes(r50, (3, 32, 32))["layer1"] != expected["layer1"]
        r18.replace_group("layer1", r50.groups["layer1"])
        with pytest.raises(RuntimeError):  # layer2 of resnet18 expects 64 channels, resnet50's layer1 gives 256
            r18(torch.empty(2, 3, 32, 32))


@pytest.mark.parametrize("arch, group", [("resnet18", "layer3"), ("mobilenet_v3_small", "stage3")])
def test_group_widths_round_trip_through_state_dict(arch, group, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, 10, in_channels=1)
    model.replace_group(group, model.new_group(group, 0.5), width=0.5)
    assert model.group_widths[group] == 0.5
    torch.save(model.state_dict(), tmp_path / "student.pt")

    state = torch.load(tmp_path / "student.pt", weights_only=True)
    rebuilt = create_model(arch, 10, in_channels=1, group_widths=model.group_widths)
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt.eval()(x))


# --- pretrained weights (a fake hub cache in tmp_path; downloads are made impossible) --------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under a tmp TORCH_HOME; returns arch -> path torchvision expects its weights at."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir so TORCH_HOME is used
    monkeypatch.delenv("DISTILLSTUDY_OFFLINE", raising=False)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)

    def path(arch):
        url = get_model_weights(arch).DEFAULT.url
        return tmp_path / "hub" / "checkpoints" / os.path.basename(url)

    return path


def _save_fake_weights(arch, path):
    """A randomly initialised torchvision model saved where its DEFAULT weights would be; returns the model."""
    torch.manual_seed(1)
    reference = getattr(torchvision.models, arch)().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    return reference


# Output layer of (torchvision model, GroupedModel): the only weights pretrained=True does not copy.
OUTPUT_LAYER = {"resnet18": ("fc", "groups.head.2"), "mobilenet_v3_small": ("classifier.3", "groups.head.3.3")}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_pretrained_loads_from_hub_cache(arch, hub):
    reference = _save_fake_weights(arch, hub(arch))
    ref_stem = (reference.conv1 if arch.startswith("resnet") else reference.features[0][0]).weight

    model = create_model(arch, 10, in_channels=3, pretrained=True).eval()
    assert torch.equal(model.groups["stem"][0].weight, ref_stem)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Everything but the output layer is torchvision's network: identical features.
    for net, layer in zip((reference, model), OUTPUT_LAYER[arch]):
        net.set_submodule(layer, torch.nn.Identity())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))

    grey = create_model(arch, 10, in_channels=1, pretrained=True)
    assert torch.allclose(grey.groups["stem"][0].weight, ref_stem.sum(1, keepdim=True))


def test_pretrained_keeps_new_output_layer_and_slim_groups_fresh(hub):
    reference = _save_fake_weights("resnet18", hub("resnet18"))
    model = create_model("resnet18", 10, in_channels=3, group_widths={"layer3": 0.5}, pretrained=True)
    assert model.groups["head"][2].weight.shape == (10, 512)
    assert torch.equal(model.groups["layer4"][0].conv1.weight, reference.layer4[0].conv1.weight)
    assert model.groups["layer3"][0].conv1.weight.shape[0] == 128  # half of 256 hidden channels, fresh
    assert not model.new_group("layer4").state_dict()["0.conv1.weight"].equal(reference.layer4[0].conv1.weight)


def test_pretrained_missing_offline_names_expected_path(hub, monkeypatch):
    monkeypatch.setenv("DISTILLSTUDY_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        create_model("resnet18", 10, in_channels=3, pretrained=True)
    message = str(err.value)
    assert str(hub("resnet18")) in message and "\n" not in message


def test_pretrained_failed_download_names_expected_path(hub):
    with pytest.raises(UserError) as err:  # the fixture's download stub plays the unreachable network
        create_model("mobilenet_v3_small", 10, in_channels=3, pretrained=True)
    message = str(err.value)
    assert str(hub("mobilenet_v3_small")) in message and "no network" in message and "\n" not in message


def test_pretrained_corrupt_file_is_a_user_error(hub):
    hub("resnet18").parent.mkdir(parents=True)
    hub("resnet18").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet18", 10, in_channels=3, pretrained=True)


def test_group_parameter_counts_reflect_width():
    with torch.device("meta"):
        full = group_parameter_counts(create_model("resnet50", 10, in_channels=3))
        slim = group_parameter_counts(create_model("resnet50", 10, in_channels=3, width=0.5))
    assert slim["stem"] == full["stem"] and slim["head"] == full["head"]
    assert all(slim[g] < full[g] for g in ("layer1", "layer2", "layer3", "layer4"))
