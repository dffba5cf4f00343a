"""digitnet: a small 4-group CNN for the embedded 8x8 digits tasks (fast enough for dozens of trials on a CPU)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .grouped import GroupedModel, scaled_width
from .registry import register_model

# Channels between groups (the interfaces). Hidden channels inside a group scale with the width factor.
_STEM_OUT, _BLOCK1_OUT, _BLOCK2_OUT, _HEAD_HIDDEN = 12, 24, 48, 48


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model
def digitnet(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
             pretrained: bool = False) -> GroupedModel:
    """stem (8x8) -> block1 (pools to 4x4) -> block2 (pools to 2x2) -> head (global pool, MLP).

    Blocks pool first and channels stay narrow: on 8x8 digits a training step costs ~0.2 MMACs per image, so a
    whole trial takes seconds on one CPU core, and the source is still learnt to ~98%.
    """
    if pretrained:
        from .errors import UserError

        raise UserError("digitnet has no pretrained weights; set model.teacher to train or checkpoint")

    def factory(name: str, w: float) -> nn.Module:
        if name == "stem":
            h = scaled_width(8, w)
            return nn.Sequential(*_conv_bn(in_channels, h), *_conv_bn(h, _STEM_OUT))
        if name == "block1":
            h = scaled_width(16, w)
            return nn.Sequential(nn.MaxPool2d(2), *_conv_bn(_STEM_OUT, h), *_conv_bn(h, _BLOCK1_OUT))
        if name == "block2":
            h = scaled_width(32, w)
            return nn.Sequential(nn.MaxPool2d(2), *_conv_bn(_BLOCK1_OUT, h), *_conv_bn(h, _BLOCK2_OUT))
        if name == "head":
            h = scaled_width(_HEAD_HIDDEN, w)
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(_BLOCK2_OUT, h),
                                 nn.ReLU(inplace=True), nn.Linear(h, num_classes))
        raise KeyError(name)

    widths = {g: (group_widths or {}).get(g, width) for g in ("stem", "block1", "block2", "head")}
    groups = OrderedDict((g, factory(g, w)) for g, w in widths.items())
    return GroupedModel("digitnet", groups, factory, widths)
