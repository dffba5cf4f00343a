"""lenet5: LeNet-5 (LeCun et al., 1998) with padded convolutions so it also runs on 8x8 digits."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .grouped import GroupedModel, scaled_width
from .registry import register_model


@register_model
def lenet5(num_classes: int, in_channels: int = 1, width: float = 1.0, group_widths=None,
           pretrained: bool = False) -> GroupedModel:
    """stem (C1+S2) -> features (C3+S4) -> classifier (C5+F6) -> head (output layer).

    Width scales the hidden units of a group; the 6/16/84 interfaces are LeNet's own.
    """
    if pretrained:
        from .errors import UserError

        raise UserError("lenet5 has no pretrained weights; set model.teacher to train or checkpoint")

    def factory(name: str, w: float) -> nn.Module:
        if name == "stem":
            h = scaled_width(6, w)
            # A 1x1 projection keeps the 6-channel interface whatever the hidden width.
            return nn.Sequential(nn.Conv2d(in_channels, h, 5, padding=2), nn.Tanh(), nn.Conv2d(h, 6, 1),
                                 nn.AvgPool2d(2, ceil_mode=True))
        if name == "features":
            h = scaled_width(16, w)
            return nn.Sequential(nn.Conv2d(6, h, 5, padding=2), nn.Tanh(), nn.Conv2d(h, 16, 1),
                                 nn.AvgPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(4))
        if name == "classifier":
            h = scaled_width(120, w)
            return nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, h), nn.Tanh(), nn.Linear(h, 84), nn.Tanh())
        if name == "head":
            return nn.Linear(84, num_classes)
        raise KeyError(name)

    widths = {g: (group_widths or {}).get(g, width) for g in ("stem", "features", "classifier", "head")}
    groups = OrderedDict((g, factory(g, w)) for g, w in widths.items())
    return GroupedModel("lenet5", groups, factory, widths)
