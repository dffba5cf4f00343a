"""Model registry, timm-style: `@register_model` on a builder named after the architecture, `create_model` to build.

A builder has the signature `builder(num_classes, in_channels, width, group_widths, pretrained) -> GroupedModel`.
"""

from __future__ import annotations

from typing import Callable

from .errors import UserError
from .grouped import GroupedModel
from .named import Registry
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


def create_model(name: str, num_classes: int, in_channels: int = 1, width: float = 1.0,
                 group_widths: dict[str, float] | None = None, pretrained: bool = False) -> GroupedModel:
    """Build architecture `name`.

    Args:
        num_classes: size of the output layer.
        in_channels: image channels of the input.
        width: hidden-width factor for every group (group interfaces never change).
        group_widths: per-group width factors overriding `width` (how slim replacements are rebuilt).
        pretrained: load torchvision's pretrained weights (only architectures that have them).

    Initial weights come from torch's global generator, under the process-wide lock; build inside
    `models.seeding.seeded_init(seed)` for weights that depend on `seed` alone.

    Example:
        >>> model = create_model("digitnet", num_classes=10, in_channels=1)
        >>> model.group_names[0], model.group_names[-1]
        ('stem', 'head')
    """
    builder = get_builder(name)
    group_widths = dict(group_widths or {})
    with GLOBAL_RNG:
        model = builder(num_classes=num_classes, in_channels=in_channels, width=width,
                        group_widths=group_widths, pretrained=pretrained)
    # Recorded so a saved state_dict can be rebuilt with create_model(arch, num_classes, in_channels, ...).
    model.num_classes, model.in_channels = num_classes, in_channels
    bad = set(group_widths) - set(model.group_names)
    if bad:
        raise UserError(f"architecture '{name}' has no layer group(s) {sorted(bad)}; groups: {model.group_names}")
    return model


def _load_builtins(torchvision: bool) -> None:
    # Imported lazily so `models.registry` has no import cycle with the modules that register into it; the
    # torchvision architectures only when asked for, since importing torchvision costs seconds per process.
    from . import digitnet, lenet  # noqa: F401

    if torchvision:
        from . import tv  # noqa: F401
