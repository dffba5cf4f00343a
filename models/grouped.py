"""GroupedModel: a network whose top-level children are its ordered layer groups.

Every architecture in the registry is expressed this way, so the pipeline can freeze, fine-tune or replace a
group by name without knowing the architecture. A group's *interface* (the shape it takes and the shape it gives)
is fixed by the architecture; its *width* (hidden channels inside the group) may change, which is what lets a
slimmer or wider replacement, or the same group from a wider donor model, drop into place.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from .seeding import GLOBAL_RNG

def scaled_width(base: int, width: float) -> int:
    """Hidden channels of a group built at `width` x its base width (at least one)."""
    return max(1, int(round(base * width)))


# Builds a fresh group: (group name, width factor) -> module with the group's fixed interface.
GroupFactory = Callable[[str, float], nn.Module]


class GroupedModel(nn.Module):
    """Runs its layer groups in order. Module path of group `g` is `groups.<g>`."""

    def __init__(self, arch: str, groups: "OrderedDict[str, nn.Module]", factory: GroupFactory,
                 group_widths: dict[str, float] | None = None):
        super().__init__()
        self.arch = arch
        self.groups = nn.ModuleDict(groups)
        self._factory = factory
        self.group_widths = {name: 1.0 for name in groups}
        self.group_widths.update(group_widths or {})

    @property
    def group_names(self) -> list[str]:
        """Layer group names, input to output."""
        return list(self.groups.keys())

    def new_group(self, name: str, width: float = 1.0) -> nn.Module:
        """A freshly initialised module for group `name` with the same interface and `width` x hidden width (drawn
        under the global-generator lock; see `models.seeding`)."""
        with GLOBAL_RNG:
            return self._factory(name, width)

    def replace_group(self, name: str, module: nn.Module, width: float | None = None) -> None:
        """Swap group `name` for `module` (same interface); record its width for reloading."""
        self.groups[name] = module
        if width is not None:
            self.group_widths[name] = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in self.groups.values():
            x = group(x)
        return x


def group_parameter_counts(model: GroupedModel) -> "OrderedDict[str, int]":
    """Number of parameters in each group, input to output."""
    return OrderedDict((name, sum(p.numel() for p in g.parameters())) for name, g in model.groups.items())


def group_output_shapes(model: GroupedModel, input_shape: tuple[int, ...]) -> "OrderedDict[str, tuple]":
    """Per-sample output shape of every group for an input of `input_shape` (C, H, W).

    One sample goes through the real model in eval mode (so no BatchNorm statistic moves) without gradients:
    cheaper than copying the model to the meta device, and every module's train/eval flag is restored after.
    """
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), device=param.device if param is not None else "cpu")
    shapes = OrderedDict()
    model.eval()
    try:
        with torch.no_grad():
            for name, group in model.groups.items():
                x = group(x)
                shapes[name] = tuple(x.shape[1:])
    finally:
        for m, training in modes.items():
            m.training = training
    return shapes
