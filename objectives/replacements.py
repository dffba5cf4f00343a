"""Replacement strategies (`pipeline.replace_with`): where a replaced layer group's new module comes from.

Strategies are registered by name; adding one is one decorated function here (or in any imported module), with no
edit elsewhere: `pipeline.replace_with` accepts every registered name.

    @register_replacement("name")
    def name(ctx: GroupToReplace) -> tuple[nn.Module, float, str]: ...

A strategy returns (module, width factor, weights label): the module must keep the group's interface (the shape
it takes and gives; `objectives.student.check_shapes` checks it), the width factor is recorded so a saved student
can be rebuilt, and the label says where the weights came from (the layer map's `weights`). It runs inside
`models.seeded_init` under a seed derived from the trial's seed and the group's name, so any module it
constructs draws its initial weights from that seed alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models import GroupedModel, InvalidChoice
from models.named import Registry


@dataclass(frozen=True)
class GroupToReplace:
    """What a replacement strategy may build the new module from."""

    teacher: GroupedModel  # the model the student is copied from (its groups' widths, `new_group`)
    group: str  # the group to replace
    slim_width: float  # the trial's `slim_width` choice
    donor: GroupedModel | None  # the source-trained donor (only for strategies registered with needs_donor)


@dataclass(frozen=True)
class Replacement:
    """A registered strategy: `build(GroupToReplace) -> (module, width, label)`; `needs_donor` makes the pipeline
    train (or load) the donor model when some group is replaced."""

    build: Callable[[GroupToReplace], tuple[nn.Module, float, str]]
    needs_donor: bool = False
    uses_slim_width: bool = False  # the study samples `search.slim_width` only for strategies that read it


_STRATEGIES: Registry[Replacement] = Registry("replacement strategy")


def register_replacement(name: str, needs_donor: bool = False, uses_slim_width: bool = False):
    """Decorator: register a strategy `(GroupToReplace) -> (module, width, label)` as `pipeline.replace_with:
    <name>`; with `needs_donor`, the trial provides a source-trained donor model as `ctx.donor`; with
    `uses_slim_width`, a study samples `search.slim_width` (`ctx.slim_width`) when some group is replaced.

    Example:
        >>> @register_replacement("zeros")
        ... def zeros(ctx):
        ...     module = ctx.teacher.new_group(ctx.group, ctx.teacher.group_widths[ctx.group])
        ...     nn.init.zeros_(next(module.parameters()))
        ...     return module, ctx.teacher.group_widths[ctx.group], "zeros"
        >>> get_replacement("zeros").needs_donor
        False
        >>> unregister_replacement("zeros")
    """
    def add(build):
        _STRATEGIES.add(name, Replacement(build, needs_donor, uses_slim_width))
        return build

    return add


# The strategy registered as a name (else a UserError naming the registered ones); the names in registration
# order; removing one (for tests that register their own strategy).
get_replacement, list_replacements, unregister_replacement = _STRATEGIES.get, _STRATEGIES.names, _STRATEGIES.remove


@register_replacement("reinit")
def reinit(ctx: GroupToReplace) -> tuple[nn.Module, float, str]:
    """The same group, freshly initialised at the teacher's width: transfer without the group's weights."""
    width = ctx.teacher.group_widths[ctx.group]
    return ctx.teacher.new_group(ctx.group, width), width, "reinit"


@register_replacement("slim", uses_slim_width=True)
def slim(ctx: GroupToReplace) -> tuple[nn.Module, float, str]:
    """A freshly initialised group `slim_width` x as wide inside (same interface): a smaller student."""
    width = ctx.teacher.group_widths[ctx.group] * ctx.slim_width
    return ctx.teacher.new_group(ctx.group, width), width, f"slim x{ctx.slim_width:g}"


@register_replacement("donor", needs_donor=True)
def donor(ctx: GroupToReplace) -> tuple[nn.Module, float, str]:
    """A copy of the same group of the donor, another model trained on the source (`model.donor_arch`,
    `model.donor_width`): a group with source-trained weights of a different width or architecture."""
    if ctx.donor is None:
        raise InvalidChoice("replace_with: donor needs a donor model (model.donor_arch)")
    if ctx.group not in ctx.donor.group_names:
        raise InvalidChoice(f"replace_with: donor {ctx.donor.arch} has no layer group '{ctx.group}' to replace it "
                            f"with; its groups: {', '.join(ctx.donor.group_names)}")
    width = ctx.donor.group_widths[ctx.group]
    return copy.deepcopy(ctx.donor.group_module(ctx.group)), width, f"donor {ctx.donor.arch} x{width:g}"
