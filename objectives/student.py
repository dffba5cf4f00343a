"""Build a student from a teacher by applying one action per layer group: freeze, finetune, replace or adapt."""

from __future__ import annotations

import copy

import torch

from models import GroupedModel, InvalidChoice, UserError, create_model, derive_seed, group_output_shapes, seeded_init
from models.adapters import adapter_for, insert_adapter
from models.errors import did_you_mean, first_line

from .params import ACTIONS
from .replacements import GroupToReplace, get_replacement


def check_layer_actions(group_names: list[str], layers: dict[str, str]) -> None:
    """Reject unknown groups or actions and assignments where nothing would train."""
    for group, action in layers.items():
        if group not in group_names:
            raise InvalidChoice(f"unknown layer group '{group}'{did_you_mean(group, group_names)}; "
                                f"groups: {', '.join(group_names)}")
        if action not in ACTIONS:
            raise InvalidChoice(f"unknown action '{action}' for layer group '{group}'"
                                f"{did_you_mean(action, ACTIONS)}; choose from: {', '.join(ACTIONS)}")
    missing = [g for g in group_names if g not in layers]
    if missing:
        raise InvalidChoice(f"no action for layer group(s) {', '.join(missing)}")
    if all(layers[g] == "freeze" for g in group_names):
        raise InvalidChoice("every layer group is 'freeze': nothing would train")


def check_shapes(student: GroupedModel, teacher: GroupedModel, input_shape: tuple[int, ...]) -> None:
    """Every group of `student` must give the shape the teacher's gives (so groups can be mixed freely)."""
    try:
        want = group_output_shapes(teacher, input_shape)
    except RuntimeError as exc:  # the architecture itself cannot take the task's images
        raise UserError(f"model.arch {teacher.arch} cannot take the task's images {tuple(input_shape)}: "
                        f"{first_line(exc)}") from None
    head, classes = teacher.group_names[-1], getattr(teacher, "num_classes", None)  # set by create_model
    if classes is not None and want[head] not in (None, (classes,)):
        raise UserError(f"model.arch {teacher.arch}: its last layer group '{head}' gives shape {want[head]}, not "
                        f"the task's {classes} class logits (the head must be the last group)")
    try:
        got = group_output_shapes(student, input_shape)
    except RuntimeError as exc:  # a group that cannot even take its input
        raise InvalidChoice(f"replaced layer groups do not fit the {teacher.arch} architecture: "
                            f"{first_line(exc)}") from None
    for g in want:
        if got[g] != want[g]:
            raise InvalidChoice(f"replaced layer group '{g}' gives shape {got[g]}, "
                                f"{teacher.arch} expects {want[g]}")


def build_student(teacher: GroupedModel, layers: dict[str, str], replace_with: str, slim_width: float,
                  donor: GroupedModel | None, input_shape: tuple[int, ...],
                  init_seed: int, adapter_rank: int = 8) -> tuple[GroupedModel, dict]:
    """Copy the teacher and apply the actions. Returns the student and its layer map
    (group -> {action, weights, width}, and for an adapted group `adapter`: its kind, channels, rank and
    parameters); frozen groups have requires_grad off. A replaced group's module comes from the registered strategy
    `replace_with` (`objectives.replacements`), an adapted group's adapter is a residual adapter of rank
    `adapter_rank` (`models.adapters`, zero-initialised: the student starts equal to the teacher there); both are
    initialised from `init_seed` and the group's own name alone (thread-safe; changing another group does not
    change them)."""
    check_layer_actions(teacher.group_names, layers)
    student = copy.deepcopy(teacher)
    device = next(teacher.parameters()).device
    shapes = group_output_shapes(teacher, input_shape) if "adapt" in layers.values() else {}
    layer_map = {}
    for group in student.group_names:
        action = layers[group]
        weights, width = "teacher", student.group_widths[group]
        for p in student.group_module(group).parameters():
            p.requires_grad_(action not in ("freeze", "adapt"))
        entry = {}
        if action == "replace":
            with seeded_init(derive_seed(init_seed, group)):
                module, width, weights = get_replacement(replace_with).build(
                    GroupToReplace(teacher=teacher, group=group, slim_width=slim_width, donor=donor))
            student.replace_group(group, module.to(device), width)
            student.group_module(group).requires_grad_(True)
        elif action == "adapt":
            with seeded_init(derive_seed(init_seed, group, "adapter")):
                try:
                    adapter = adapter_for(shapes[group], adapter_rank)
                except ValueError as exc:
                    raise InvalidChoice(f"layer group '{group}' cannot be adapted: {exc}") from None
            after = insert_adapter(student, group, adapter.to(device), input_shape)
            entry["adapter"] = {**adapter.spec(), "params": sum(p.numel() for p in adapter.parameters()),
                                **({"after": after} if after else {})}
        layer_map[group] = {"action": action, "weights": weights, "width": width, **entry}
    check_shapes(student, teacher, input_shape)
    return student, layer_map


def frozen_groups(layer_map: dict) -> set[str]:
    """Names of the groups whose inherited weights do not train (freeze; adapt, where only the adapter trains):
    they stay in eval mode while the student trains, so their BatchNorm running statistics never move."""
    return {g for g, m in layer_map.items() if m["action"] in ("freeze", "adapt")}


def trainable_parameters(model: GroupedModel, layer_map: dict) -> list[torch.nn.Parameter]:
    """Parameters of the non-frozen groups that train: all of a fine-tuned or replaced group's, only the adapter of
    an adapted group (its inherited weights stay frozen)."""
    return [p for g in model.group_names if layer_map[g]["action"] != "freeze"
            for p in model.group_module(g).parameters() if p.requires_grad]


def empty_model_like(model: GroupedModel, num_classes: int, in_channels: int) -> GroupedModel:
    """A fresh model with the same architecture and group widths (to load a saved student into)."""
    return create_model(model.arch, num_classes, in_channels, group_widths=model.group_widths,
                        groups=model.custom_groups)
