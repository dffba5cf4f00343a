"""Model registry, timm-style: `@register_model` on a builder named after the architecture, `create_model` to build.

A builder has the signature `builder(num_classes, in_channels, width, group_widths, pretrained) -> GroupedModel`.
`create_model` also builds networks from outside the registry (`torchvision:NAME`, `timm:NAME`,
`package.module:function`, see `models.external`), grouped by module names (`models.network.NetworkGroups`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .default_groups import default_groups
from .errors import UserError
from .external import NetworkSource, is_external, network_source
from .grouped import GroupedModel
from .named import Registry
from .network import NetworkGroups
from .seeding import GLOBAL_RNG

_MODELS: Registry[Callable[..., GroupedModel]] = Registry(
    "architecture", loaders=(lambda: _load_builtins(torchvision=False), lambda: _load_builtins(torchvision=True)))


def register_model(builder: Callable[..., GroupedModel]) -> Callable[..., GroupedModel]:
    """Register `builder` under its function name."""
    return _MODELS.add(builder.__name__, builder)


def list_models() -> list[str]:
    """Names of all registered architectures."""
    return sorted(_MODELS.names())


def get_builder(name: str) -> Callable[..., GroupedModel]:
    """The builder registered as `name`, or a UserError naming the valid architectures."""
    return _MODELS.get(name)


def check_arch(name: str) -> None:
    """Raise a one-line UserError when `name` is no registered architecture and no importable external one."""
    if is_external(name):
        network_source(name)
    else:
        get_builder(name)


def arch_fingerprint(name: str) -> str:
    """What a model's weights depend on beyond its name: the library version of a torchvision or timm network, a
    hash of the file defining a user's builder ('' for registered architectures, covered by the code version)."""
    return network_source(name).fingerprint if is_external(name) else ""


def create_model(name: str, num_classes: int, in_channels: int = 1, width: float = 1.0,
                 group_widths: dict[str, float] | None = None, pretrained: bool = False,
                 groups: dict[str, list[str]] | None = None) -> GroupedModel:
    """Build architecture `name`: a registered one, `torchvision:NAME`, `timm:NAME` or `package.module:function`.

    Args:
        num_classes: size of the output layer.
        in_channels: image channels of the input.
        width: hidden-width factor for every group (group interfaces never change).
        group_widths: per-group width factors overriding `width` (how slim replacements are rebuilt).
        pretrained: load pretrained weights (torchvision's or timm's, from their local caches; a user builder
            that takes `pretrained`).
        groups: layer group -> module-name prefixes, input to output (`model.groups`); None = the default
            grouping (`models.default_groups`). Regroups a registered architecture too.

    Initial weights come from torch's global generator, under the process-wide lock; build inside
    `models.seeding.seeded_init(seed)` for weights that depend on `seed` alone.

    Example:
        >>> model = create_model("digitnet", num_classes=10, in_channels=1)
        >>> model.group_names[0], model.group_names[-1]
        ('stem', 'head')
    """
    group_widths = dict(group_widths or {})
    if groups or is_external(name):
        model = _network_model(name, num_classes, in_channels, width, group_widths, pretrained, groups)
        model.num_classes, model.in_channels = num_classes, in_channels
        return model
    builder = get_builder(name)
    with GLOBAL_RNG:
        model = builder(num_classes=num_classes, in_channels=in_channels, width=width,
                        group_widths=group_widths, pretrained=pretrained)
    # Recorded so a saved state_dict can be rebuilt with create_model(arch, num_classes, in_channels, ...).
    model.num_classes, model.in_channels = num_classes, in_channels
    bad = set(group_widths) - set(model.group_names)
    if bad:
        raise UserError(f"architecture '{name}' has no layer group(s) {sorted(bad)}; groups: {model.group_names}")
    return model


def _network_model(name: str, num_classes: int, in_channels: int, width: float, group_widths: dict[str, float],
                   pretrained: bool, groups: dict | None) -> NetworkGroups:
    source = _registered_source(name) if not is_external(name) else network_source(name)

    def factory(w: float):
        return source.build(num_classes, in_channels, w, False)

    with GLOBAL_RNG:
        net = source.build(num_classes, in_channels, width, pretrained)
    spec = parse_groups(groups) if groups else default_groups(net)
    bad = set(group_widths) - set(spec)
    if bad:
        raise UserError(f"architecture '{name}' has no layer group(s) {sorted(bad)}; groups: {list(spec)}")
    model = NetworkGroups(name, net, spec, factory, {g: width for g in spec})
    for g, w in group_widths.items():  # rebuilding a student with slim groups: each cut from a net at its width
        if w != width:
            model.replace_group(g, model.new_group(g, w), w)
    model.custom_groups = OrderedDict(spec) if groups else None
    return model


def parse_groups(groups) -> OrderedDict[str, list[str]]:
    """`model.groups` as group -> list of module-name prefixes (a single name may be written without brackets);
    one-line UserErrors for anything else."""
    if not isinstance(groups, dict):
        raise UserError(f"model.groups: expected a mapping of layer group -> list of module names, got "
                        f"{type(groups).__name__}")
    spec = OrderedDict()
    for group, prefixes in groups.items():
        prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
        if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
            raise UserError(f"model.groups.{group}: expected a list of module names, e.g. [conv1, bn1]")
        spec[str(group)] = list(prefixes)
    return spec


def _registered_source(name: str) -> NetworkSource:
    """A registered architecture as a network to regroup by module names (its modules are `groups.<group>...`)."""
    builder = get_builder(name)

    def build(num_classes: int, in_channels: int, width: float, pretrained: bool):
        return builder(num_classes=num_classes, in_channels=in_channels, width=width, group_widths={},
                       pretrained=pretrained)

    return NetworkSource(name, build, "")


def _load_builtins(torchvision: bool) -> None:
    # Imported lazily so `models.registry` has no import cycle with the modules that register into it; the
    # torchvision architectures only when asked for, since importing torchvision costs seconds per process.
    from . import digitnet, lenet  # noqa: F401

    if torchvision:
        from . import tv  # noqa: F401
