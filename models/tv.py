"""torchvision architectures as GroupedModels: resnet18, resnet34, resnet50, mobilenet_v3_small.

Groups (input to output):
    resnet*:            stem (conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4, head (avgpool, flatten, fc)
    mobilenet_v3_small: stem (features[0]), stage1 (features[1]), stage2 (features[2:4]), stage3 (features[4:9]),
                        stage4 (features[9:12]), head (features[12], avgpool, flatten, classifier)

Group interfaces are torchvision's, so resnet18 and resnet34 groups are interchangeable; resnet50's are 4x wider.
The width factor scales only the hidden channels inside a group:
    BasicBlock (resnet18/34): the channels between conv1 and conv2;
    Bottleneck (resnet50):    the inner width (torchvision's own `base_width` knob, as wide_resnet50_2 uses);
    InvertedResidual:         the expanded channels (rounded to a multiple of 8 as torchvision does; stage1's
                              block, which has no expansion at width 1.0, gains torchvision's 1x1 expand conv);
    mobilenet head:           the 576 channels of features[12] and the 1024 hidden units of the classifier;
    resnet stem/head and mobilenet stem: no hidden dimension, so width leaves them unchanged.

Pretrained weights (`pretrained=True`) are torchvision's DEFAULT weights, read through its weights API from the
torch hub cache, `$TORCH_HOME/hub/checkpoints/<file>` (or `torch.hub.get_dir()/checkpoints` when set), downloading
them when absent (`models.weights`). Set `DISTILLSTUDY_OFFLINE` (any value but empty or 0) to never download: a
missing file is then reported at once instead of waiting on the network. Either way a missing or unreadable file is a
UserError naming the file and its path. The output layer is always freshly initialised for `num_classes`, and so is
any group whose width is not 1.0 (pretrained weights do not fit it). With `in_channels != 3` the pretrained stem
kernel is summed over RGB and divided by `in_channels` for every input channel, so an image whose channels all hold
the same grey value gets the response the RGB network gave that grey image.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, _mobilenet_v3_conf
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3
from torchvision.ops.misc import Conv2dNormActivation

from .grouped import GroupedModel, scaled_width
from .registry import register_model
from .seeding import GeneratorDropout
from .weights import adapt_stem, torchvision_state_dict


def _init(module: nn.Module, linear_std: float | None = None) -> nn.Module:
    """Initialise `module` the way torchvision's constructors do, so new groups start like torchvision's
    (ResNet leaves Linear at PyTorch's default, MobileNetV3 draws it from N(0, 0.01))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
    return module


def _build(arch: str, builders: dict[str, Callable[[float], nn.Module]], width: float, group_widths,
           pretrained: bool, load: Callable[[GroupedModel], None]) -> GroupedModel:
    """Assemble a GroupedModel from one fresh-group builder per group name; `load` fills in pretrained weights."""
    def factory(name: str, w: float) -> nn.Module:
        return builders[name](w)

    widths = {g: (group_widths or {}).get(g, width) for g in builders}
    model = GroupedModel(arch, OrderedDict((g, factory(g, w)) for g, w in widths.items()), factory, widths)
    if pretrained:
        load(model)
    return model


# --- ResNet -------------------------------------------------------------------------------------------------

def _resnet_block(block: type, inplanes: int, planes: int, stride: int, width: float) -> nn.Module:
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:  # same projection shortcut as torchvision's ResNet._make_layer
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    h = scaled_width(planes, width)
    if block is Bottleneck:
        # Inner width = int(planes * base_width / 64); planes is a power of two, so this gives exactly h.
        return Bottleneck(inplanes, planes, stride, downsample, base_width=64 * h / planes)
    b = BasicBlock(inplanes, planes, stride, downsample)
    if h != planes:  # BasicBlock ties its hidden width to `planes`: rewire the convs around the hidden channels
        b.conv1, b.bn1, b.conv2 = conv3x3(inplanes, h, stride), nn.BatchNorm2d(h), conv3x3(h, planes)
    return b


def _resnet(arch: str, block: type, depths: list[int], num_classes: int, in_channels: int, width: float,
            group_widths, pretrained: bool) -> GroupedModel:
    def layer(i: int, w: float) -> nn.Module:
        planes = 64 * 2 ** i
        inplanes = 64 if i == 0 else planes // 2 * block.expansion
        blocks = [_resnet_block(block, inplanes, planes, 1 if i == 0 else 2, w)]
        blocks += [_resnet_block(block, planes * block.expansion, planes, 1, w) for _ in range(depths[i] - 1)]
        return _init(nn.Sequential(*blocks))

    builders = {"stem": lambda w: _init(nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
        nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)))}
    builders.update({f"layer{i + 1}": partial(layer, i) for i in range(4)})
    builders["head"] = lambda w: _init(nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512 * block.expansion, num_classes)))

    renames = [("conv1.", "stem.0."), ("bn1.", "stem.1."), ("fc.", "head.2.")]
    renames += [(f"layer{i}.", f"layer{i}.") for i in range(1, 5)]
    load = partial(_load_pretrained, renames=renames, stem_conv="stem.0.weight", out_layer="head.2.",
                   in_channels=in_channels)
    return _build(arch, builders, width, group_widths, pretrained, load)


@register_model
def resnet18(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
             pretrained: bool = False) -> GroupedModel:
    """ResNet-18 (BasicBlocks 2-2-2-2): stem, layer1-4 (64/128/256/512 channels out), head."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, group_widths, pretrained)


@register_model
def resnet34(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
             pretrained: bool = False) -> GroupedModel:
    """ResNet-34 (BasicBlocks 3-4-6-3): same group interfaces as resnet18, deeper groups."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width, group_widths, pretrained)


@register_model
def resnet50(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
             pretrained: bool = False) -> GroupedModel:
    """ResNet-50 (Bottlenecks 3-4-6-3): stem, layer1-4 (256/512/1024/2048 channels out), head."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width, group_widths, pretrained)


# --- MobileNetV3 ----------------------------------------------------------------------------------------------

# Stage -> slice of torchvision's inverted-residual settings; block k of the settings is features[k + 1].
# Stages end where the resolution halves next (the paper's C1..C4).
_MOBILENET_STAGES = {"stage1": (0, 1), "stage2": (1, 3), "stage3": (3, 8), "stage4": (8, 11)}


@register_model
def mobilenet_v3_small(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
                       pretrained: bool = False) -> GroupedModel:
    """MobileNetV3-Small: stem, stage1-4 (16/24/48/96 channels out), head (576-channel conv, 1024-unit MLP)."""
    settings, last_channel = _mobilenet_v3_conf("mobilenet_v3_small")
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # torchvision's MobileNetV3 norm layer
    init = partial(_init, linear_std=0.01)

    def block(cnf, w: float) -> nn.Module:
        cnf = copy.copy(cnf)
        cnf.expanded_channels = cnf.adjust_channels(cnf.expanded_channels, w)
        return InvertedResidual(cnf, norm)

    def stage(name: str, w: float) -> nn.Module:
        start, stop = _MOBILENET_STAGES[name]
        return init(nn.Sequential(*(block(cnf, w) for cnf in settings[start:stop])))

    def head(w: float) -> nn.Module:
        conv, hidden = scaled_width(6 * settings[-1].out_channels, w), scaled_width(last_channel, w)
        return init(nn.Sequential(
            Conv2dNormActivation(settings[-1].out_channels, conv, 1, norm_layer=norm, activation_layer=nn.Hardswish),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
            nn.Sequential(nn.Linear(conv, hidden), nn.Hardswish(inplace=True), GeneratorDropout(0.2),
                          nn.Linear(hidden, num_classes))))

    builders = {"stem": lambda w: init(Conv2dNormActivation(
        in_channels, settings[0].input_channels, 3, stride=2, norm_layer=norm, activation_layer=nn.Hardswish))}
    builders.update({s: partial(stage, s) for s in _MOBILENET_STAGES})
    builders["head"] = head

    renames = [("features.0.", "stem."), (f"features.{len(settings) + 1}.", "head.0."), ("classifier.", "head.3.")]
    renames += [(f"features.{k + 1}.", f"{s}.{k - start}.")
                for s, (start, stop) in _MOBILENET_STAGES.items() for k in range(start, stop)]
    load = partial(_load_pretrained, renames=renames, stem_conv="stem.0.weight", out_layer="head.3.3.",
                   in_channels=in_channels)
    return _build("mobilenet_v3_small", builders, width, group_widths, pretrained, load)


# --- pretrained weights ---------------------------------------------------------------------------------------

def _load_pretrained(model: GroupedModel, renames: list[tuple[str, str]], stem_conv: str, out_layer: str,
                     in_channels: int) -> None:
    """Copy torchvision's pretrained weights into `model`'s width-1.0 groups, except the output layer.

    `renames` maps torchvision key prefixes to group key prefixes; `stem_conv` is the (grouped) key of the first
    convolution, adapted to `in_channels`; keys under `out_layer` keep their fresh initialisation.
    """
    state = {}
    for key, value in torchvision_state_dict(model.arch).items():
        old, new = next(((o, n) for o, n in renames if key.startswith(o)), (None, None))
        if old is None:  # a torchvision layout change, not a user mistake
            raise RuntimeError(f"{model.arch}: no group for pretrained weight '{key}'")
        key = new + key[len(old):]
        if key.startswith(out_layer) or model.group_widths[key.split(".")[0]] != 1.0:
            continue
        if key == stem_conv and in_channels != 3:
            value = adapt_stem(value, in_channels)
        state[key] = value
    result = model.groups.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not k.startswith(out_layer) and model.group_widths[k.split(".")[0]] == 1.0]
    if missing or result.unexpected_keys:  # a torchvision layout change, not a user mistake
        raise RuntimeError(f"{model.arch} pretrained weights do not fit: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
