"""GroupedModel: a network whose top-level children are its ordered layer groups.

Every architecture in the registry is expressed this way, so the pipeline can freeze, fine-tune or replace a
group by name without knowing the architecture. A group's *interface* (the shape it takes and the shape it gives)
is fixed by the architecture; its *width* (hidden channels inside the group) may change, which is what lets a
slimmer or wider replacement, or the same group from a wider donor model, drop into place.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .errors import InvalidChoice
from .seeding import GLOBAL_RNG


def scaled_width(base: int, width: float) -> int:
    """Hidden channels of a group built at `width` x its base width (at least one)."""
    return max(1, int(round(base * width)))


# Builds a fresh group: (group name, width factor) -> module with the group's fixed interface.
GroupFactory = Callable[[str, float], nn.Module]


class GroupedModel(nn.Module):
    """Runs its layer groups in order. Module path of group `g` is `groups.<g>`.

    The pipeline reaches a group only through `group_names`, `group_module`, `group_hook_modules`,
    `group_prefixes`, `new_group` and `replace_group`, so `models.network.NetworkGroups` (any network, its groups
    named by module-name prefixes) can stand in for it.
    """

    custom_groups: dict[str, list[str]] | None = None  # the `model.groups` it was built with (None: its own)

    def __init__(self, arch: str, groups: OrderedDict[str, nn.Module], factory: GroupFactory,
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

    def group_module(self, name: str) -> nn.Module:
        """Group `name` as one module: its parameters, train/eval switch, and what `replace_group` takes."""
        return self.groups[name]

    def group_hook_modules(self, name: str) -> list[nn.Module]:
        """The modules that run group `name`: the output of the last of them to run is the group's output."""
        return [self.groups[name]]

    def group_prefixes(self, name: str) -> list[str]:
        """Prefixes of the names (in `named_parameters`, `state_dict`) of group `name`'s tensors."""
        return [f"groups.{name}"]

    def new_group(self, name: str, width: float = 1.0) -> nn.Module:
        """A freshly initialised module for group `name` with the same interface and `width` x hidden width (drawn
        under the global-generator lock; see `models.seeding`)."""
        with GLOBAL_RNG:
            return self._factory(name, width)

    def replace_group(self, name: str, module: nn.Module, width: float | None = None) -> None:
        """Swap group `name` for `module` (same interface); record its width for reloading."""
        from .network import GroupParts  # the groups of a NetworkGroups model: modules at other paths

        if isinstance(module, GroupParts):
            raise InvalidChoice(f"layer group '{name}' of {self.arch} cannot take the modules {module.paths} of "
                                "another kind of network")
        self.groups[name] = module
        if width is not None:
            self.group_widths[name] = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in self.groups.values():
            x = group(x)
        return x


def group_parameter_counts(model: GroupedModel) -> OrderedDict[str, int]:
    """Number of parameters in each group, input to output."""
    return OrderedDict((g, sum(p.numel() for p in model.group_module(g).parameters())) for g in model.group_names)


def in_prefixes(name: str, prefixes) -> bool:
    """Whether tensor or module `name` is under one of the dotted `prefixes` (`layer1` covers `layer1.0.conv1`, not
    `layer10`)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def hook_group_outputs(model: GroupedModel, groups, store: dict) -> list:
    """Forward hooks that put each of `groups`' output into `store[group]` on every forward pass (the output of the
    group's last module to run); returns the handles to remove."""
    def capture(group: str):
        def hook(_module, _inputs, output):
            store[group] = output
        return hook

    return [m.register_forward_hook(capture(g)) for g in groups for m in model.group_hook_modules(g)]


def group_output_shapes(model: GroupedModel, input_shape: tuple[int, ...]) -> OrderedDict[str, tuple | None]:
    """Per-sample output shape of every group for an input of `input_shape` (C, H, W); None for a group that is
    only parameters (a class token) and gives no output of its own.

    One sample goes through the real model in eval mode (so no BatchNorm statistic moves) without gradients, its
    group outputs caught by hooks; every module's train/eval flag is restored after.
    """
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), device=param.device if param is not None else "cpu")
    outputs: dict = {}
    handles = hook_group_outputs(model, model.group_names, outputs)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return OrderedDict((g, tuple(outputs[g].shape[1:]) if torch.is_tensor(outputs.get(g)) else None)
                       for g in model.group_names)
