"""Default layer groups of a network, read from its structure (no forward pass): input to output, every
parameter in exactly one group.

    ResNet (torchvision, timm):      stem (conv1, bn1), layer1 .. layer4, head (fc)
    `features` networks (torchvision MobileNet V2/V3, EfficientNet, ConvNeXt, VGG, DenseNet):
                                     stem (features up to the first downsampling one), stage1 .. stageN (a new
                                     stage at every feature block that downsamples), head (classifier, ...)
    torchvision ViT:                 stem (conv_proj, class_token, encoder.pos_embedding), blocks1 .. blocks4
                                     (the encoder layers in four runs), head (encoder.ln, heads)
    timm stem + stages networks (EfficientNet, MobileNetV3, ConvNeXt, ViT, ...): stem (everything before
                                     `stages`/`blocks`/`layers`, root parameters such as a class token),
                                     stage1 .. stageN (one per stage) or, for a flat run of blocks (a transformer's
                                     `blocks`, or more than 8 stages), blocks1 .. blocks4; head (everything after)
    anything else (a user's module): one group per top-level child with parameters, in definition order.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

Groups = "OrderedDict[str, list[str]]"

_STAGE_CONTAINERS = ("stages", "blocks", "layers")
_MAX_STAGES = 8  # more blocks than this in one flat run is a transformer's block list: cut it into four groups


def default_groups(net: nn.Module) -> Groups:
    """The default layer groups of `net` (see the module docstring for the rules)."""
    for rule in (_resnet, _torchvision_vit, _features, _stem_stages_head):
        groups = rule(net)
        if groups:
            return OrderedDict((g, p) for g, p in groups.items() if p)
    return _children(net)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _children(net: nn.Module) -> Groups:
    groups = OrderedDict((name, [name]) for name, child in net.named_children() if _has_params(child))
    root = [name for name, _ in net.named_parameters(recurse=False)]
    if root:  # parameters held by the network itself go with its first group
        first = next(iter(groups), "params")
        groups[first] = root + groups.get(first, [])
    return groups


def _split_at(net: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """Top-level children with parameters before the first of `names` and after the last of them."""
    children = [n for n, c in net.named_children() if _has_params(c)]
    first, last = children.index(names[0]), children.index(names[-1])
    return children[:first], children[last + 1:]


def _resnet(net: nn.Module) -> Groups | None:
    layers = [f"layer{i}" for i in range(1, 5)]
    if not all(isinstance(getattr(net, n, None), nn.Module) for n in layers):
        return None
    before, after = _split_at(net, layers)
    root = [n for n, _ in net.named_parameters(recurse=False)]
    return OrderedDict([("stem", root + before), *((n, [n]) for n in layers), ("head", after)])


def _runs(names: list[str], count: int = 4) -> list[list[str]]:
    """`names` cut into `count` consecutive runs of (nearly) equal length."""
    size, extra = divmod(len(names), count)
    runs, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        runs.append(names[start:end])
        start = end
    return [r for r in runs if r]


def _torchvision_vit(net: nn.Module) -> Groups | None:
    encoder = getattr(net, "encoder", None)
    if not (hasattr(net, "conv_proj") and hasattr(net, "class_token") and hasattr(encoder, "layers")):
        return None
    layers = [f"encoder.layers.{n}" for n, _ in encoder.layers.named_children()]
    groups = OrderedDict(stem=["conv_proj", "class_token", "encoder.pos_embedding"])
    groups.update((f"blocks{i + 1}", run) for i, run in enumerate(_runs(layers)))
    groups["head"] = [f"encoder.{n}" for n, c in encoder.named_children() if n != "layers" and _has_params(c)]
    groups["head"] += [n for n, c in net.named_children() if n not in ("conv_proj", "encoder") and _has_params(c)]
    return groups


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        stride = getattr(m, "stride", 1)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and max(_pair(stride)) > 1:
            return True
    return False


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _features(net: nn.Module) -> Groups | None:
    features = getattr(net, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    blocks = list(features.named_children())
    stem_end = next((i for i, (_, b) in enumerate(blocks) if _downsamples(b)), 0)
    groups = OrderedDict(stem=[f"features.{n}" for n, b in blocks[:stem_end + 1] if _has_params(b)])
    stage: list[str] = []
    for name, block in blocks[stem_end + 1:]:
        if _downsamples(block) and stage:
            groups[f"stage{len(groups)}"] = stage
            stage = []
        if _has_params(block):
            stage.append(f"features.{name}")
    if stage:
        groups[f"stage{len(groups)}"] = stage
    groups["head"] = [n for n, c in net.named_children() if n != "features" and _has_params(c)]
    root = [n for n, _ in net.named_parameters(recurse=False)]
    groups["stem"] = root + groups["stem"]
    return groups


def _stem_stages_head(net: nn.Module) -> Groups | None:
    name = next((n for n in _STAGE_CONTAINERS if isinstance(getattr(net, n, None), (nn.Sequential, nn.ModuleList))),
                None)
    if name is None:
        return None
    before, after = _split_at(net, [name])
    root = [n for n, _ in net.named_parameters(recurse=False)]
    container = getattr(net, name)
    children = [f"{name}.{n}" for n, c in container.named_children() if _has_params(c)]
    groups = OrderedDict(stem=root + before)
    # A flat run of blocks (a transformer's `blocks`, not a list of stages) is cut into four runs.
    flat = name == "blocks" and not any(isinstance(c, (nn.Sequential, nn.ModuleList)) for c in container.children())
    if flat or len(children) > _MAX_STAGES:
        groups.update((f"blocks{i + 1}", run) for i, run in enumerate(_runs(children)))
    else:
        groups.update((f"stage{i + 1}", [c]) for i, c in enumerate(children))
    groups["head"] = after
    return groups
