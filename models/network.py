"""NetworkGroups: any network (torchvision, timm, a user's module) with its layer groups named by module-name
prefixes, e.g. `{stem: [conv1, bn1], layer1: [layer1], ..., head: [fc]}`.

Unlike `GroupedModel`, whose groups are its top-level children run in order, the network keeps its own forward
(a ViT's class token, a ResNet's residual stem); a group is only a set of its modules and parameters. Every
parameter belongs to exactly one group, checked when the model is built, so freezing, training and replacing
groups together cover the whole network exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from .errors import InvalidChoice, UserError
from .grouped import GroupedModel, in_prefixes
from .seeding import GLOBAL_RNG

# Builds the bare network at a width factor: (width) -> nn.Module. Raises InvalidChoice for a width the
# architecture cannot take.
NetworkFactory = Callable[[float], nn.Module]


class GroupParts(nn.Module):
    """One group's modules and bare parameters as one module, keyed by their paths in the network: what
    `NetworkGroups.group_module` gives (its parameters are the network's own, not copies) and `replace_group`
    takes. Never called: the network runs them in its own forward."""

    def __init__(self, parts: OrderedDict[str, nn.Module | nn.Parameter]):
        super().__init__()
        self.paths = list(parts)
        for i, part in enumerate(parts.values()):
            if isinstance(part, nn.Parameter):
                self.register_parameter(f"p{i}", part)
            else:
                self.add_module(f"m{i}", part)

    def part(self, i: int) -> nn.Module | nn.Parameter:
        """The module or parameter at `self.paths[i]`."""
        return getattr(self, f"m{i}") if f"m{i}" in self._modules else getattr(self, f"p{i}")

    def forward(self, *_):
        raise RuntimeError("GroupParts is a view of a network's modules; run the network instead")


def check_groups(net: nn.Module, groups: OrderedDict[str, list[str]], arch: str) -> None:
    """Every prefix must name a module or parameter of `net`, and every parameter fall under exactly one group:
    else a one-line UserError naming the module (or parameter) and the group(s)."""
    modules, params = dict(net.named_modules()), dict(net.named_parameters())
    if not groups:
        raise UserError(f"model.groups: {arch} needs at least one layer group")
    for group, prefixes in groups.items():
        if not prefixes:
            raise UserError(f"model.groups.{group}: empty list of module names")
        for prefix in prefixes:
            if prefix not in modules and prefix not in params:
                raise UserError(f"model.groups.{group}: '{prefix}' is no module or parameter of {arch}; its "
                                f"top-level modules: {', '.join(n for n, _ in net.named_children())}")
    for name in params:
        owners = [g for g, prefixes in groups.items() for p in prefixes if in_prefixes(name, [p])]
        if len(owners) != 1:
            what = _owner_module(name, modules)
            if not owners:
                raise UserError(f"model.groups: module '{what}' of {arch} is in no layer group (parameter '{name}'); "
                                f"add it to one of {', '.join(groups)}")
            raise UserError(f"model.groups: module '{what}' of {arch} is in more than one layer group "
                            f"({', '.join(owners)}); give it to one")
    empty = [g for g, prefixes in groups.items() if not any(in_prefixes(n, prefixes) for n in params)]
    if empty:
        raise UserError(f"model.groups.{empty[0]}: the layer group has no parameters")


def _owner_module(param: str, modules: dict) -> str:
    owner = param.rsplit(".", 1)[0] if "." in param else param
    return owner if owner in modules else param


class NetworkGroups(GroupedModel):
    """A network (`self.net`) whose layer groups are lists of module-name prefixes, input to output.

    Args:
        arch: the `model.arch` it was built from (`torchvision:resnet18`, `my.module:build`).
        net: the network, already shaped for the task (classes, input channels).
        groups: group name -> prefixes of module or parameter names in `net` (checked by `check_groups`).
        factory: builds a fresh `net` at a width factor (fresh groups and slim replacements are cut from it).
        group_widths: per-group width of `net`'s groups (1.0 unless rebuilt with slim groups).
    """

    def __init__(self, arch: str, net: nn.Module, groups: OrderedDict[str, list[str]], factory: NetworkFactory,
                 group_widths: dict[str, float] | None = None):
        nn.Module.__init__(self)  # not GroupedModel's: there is no ModuleDict of groups to run in order
        check_groups(net, groups, arch)
        self.arch = arch
        self.net = net
        self.group_spec = OrderedDict((g, list(p)) for g, p in groups.items())
        self._factory = factory
        self.group_widths = {g: 1.0 for g in groups}
        self.group_widths.update(group_widths or {})

    @property
    def group_names(self) -> list[str]:
        return list(self.group_spec)

    def _parts(self, net: nn.Module, name: str) -> GroupParts:
        return GroupParts(OrderedDict((p, _get(net, p)) for p in self.group_spec[name]))

    def group_module(self, name: str) -> GroupParts:
        return self._parts(self.net, name)

    def group_hook_modules(self, name: str) -> list[nn.Module]:
        return [m for m in (_get(self.net, p) for p in self.group_spec[name]) if isinstance(m, nn.Module)]

    def group_prefixes(self, name: str) -> list[str]:
        return [f"net.{p}" for p in self.group_spec[name]]

    def new_group(self, name: str, width: float = 1.0) -> GroupParts:
        """Group `name` cut from a freshly built network at `width` (the architecture's own initialisation)."""
        with GLOBAL_RNG:
            return self._parts(self._factory(width), name)

    def replace_group(self, name: str, module: nn.Module, width: float | None = None) -> None:
        if not isinstance(module, GroupParts) or module.paths != self.group_spec[name]:
            got = module.paths if isinstance(module, GroupParts) else type(module).__name__
            raise InvalidChoice(f"layer group '{name}' of {self.arch} is {self.group_spec[name]}; a replacement "
                                f"gave {got}")
        for i, path in enumerate(module.paths):
            part = module.part(i)
            parent, _, leaf = path.rpartition(".")
            owner = self.net.get_submodule(parent) if parent else self.net
            setattr(owner, leaf, part)  # registers a Module as a child, a Parameter as a parameter
        if width is not None:
            self.group_widths[name] = width

    def forward(self, x):
        return self.net(x)


def _get(net: nn.Module, path: str) -> nn.Module | nn.Parameter:
    parent, _, leaf = path.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    return getattr(owner, leaf)
