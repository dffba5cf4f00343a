"""The search space, built in one place from the config's `search` section and the parameter table
(`objectives.params.PARAMS`: each choice's type, bounds, default search and activity rule).

A value in `search` is a pin (scalar), a range (`{low, high, log?, step?, default?}`) or a categorical set (list).
`search.layers.actions` is the set of actions sampled for every layer group that `search.layers.<group>` does not
pin. `trial run` takes each range's default (else its low end) and each list's first element; a study samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic
from pydantic import Field

from models import create_model
from models.errors import UserError, did_you_mean
from objectives.fields import SETTINGS, Bool, Float
from objectives.params import ACTIONS, PARAMS, ParamSpec, layer_param
from objectives.settings import TrialChoices
from study.config.validation import validate

DEFAULT_ACTIONS = ["finetune", "freeze", "replace"]  # adapt is opt-in: search.layers.actions lists it


@dataclass
class Param:
    """One parameter's search: `fixed` (value), `range` (low/high/log/step/default) or `categorical` (choices)."""

    name: str
    mode: str
    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)

    def default(self):
        if self.mode == "fixed":
            return self.value
        if self.mode == "categorical":
            return self.choices[0]
        return self.value if self.value is not None else self.low

    def suggest(self, trial, name: str | None = None):
        """Sample with `trial.suggest_*` (pins are returned as they are and are not Optuna parameters)."""
        name = name or self.name
        if self.mode == "fixed":
            return self.value
        if self.mode == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if PARAMS[self.name].kind is int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        """The values a grid search visits."""
        if self.mode == "fixed":
            return [self.value]
        if self.mode == "categorical":
            return list(self.choices)
        if PARAMS[self.name].kind is int:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if not self.step:
            raise UserError(f"search.{self.name}: the grid sampler needs a list or a range with step")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass
class SearchSpace:
    """The validated `search` section."""

    params: dict[str, Param] = field(default_factory=dict)
    actions: list[str] = field(default_factory=lambda: list(DEFAULT_ACTIONS))
    pinned_layers: dict[str, list[str]] = field(default_factory=dict)  # group -> allowed actions (1 = pinned)
    groups: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def group_actions(self) -> dict[str, list[str]]:
        """Allowed actions of every layer group, input to output."""
        return {g: self.pinned_layers.get(g, self.actions) for g in self.groups}

    def is_empty(self) -> bool:
        """True when nothing is left to search (every choice pinned, or never sampled: the adapter rank where no
        group can be adapted)."""
        adapts = any("adapt" in a for a in self.group_actions().values())
        return all(p.mode == "fixed" for n, p in self.params.items() if n != "adapter_rank" or adapts) and \
            all(len(a) == 1 for a in self.group_actions().values())

    def defaults(self, recipe: str | None = None) -> TrialChoices:
        """The fixed choices `trial run` uses: pins, range defaults, first list elements (the finetune recipe's
        unused KD choices at 0, as in a study); `recipe` overrides the configured one."""
        def pick(name: str):
            return recipe if name == "recipe" and recipe else self.params[name].default()

        return resolve_choices(self, "", pick, lambda g, acts: acts[0])

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)


def parse_search(raw, cfg) -> SearchSpace:
    """Validate the `search` section against the parameter table and the architecture's layer groups."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"search: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in PARAMS and key != "layers":
            raise UserError(f"search.{key}: unknown choice{did_you_mean(key, [*PARAMS, 'layers'])}; "
                            f"searchable: layers, {', '.join(PARAMS)}")
    space = SearchSpace(raw=copy.deepcopy(raw))
    defaults = {"layer_term": cfg.pipeline.layer_term}  # the old key stays the default, so old configs run unchanged
    for name, spec in PARAMS.items():
        space.params[name] = _parse_param(name, spec, raw.get(name, defaults.get(name, spec.default)))
    _check_layer_term_keys(space.params["layer_term"], cfg.pipeline.layer_term)
    # Group names depend only on the architecture, so a throwaway 2-class model answers.
    space.groups = create_model(cfg.model.arch, num_classes=2, in_channels=1, width=cfg.model.width,
                                groups=cfg.model.groups or None).group_names
    _parse_layers(space, raw.get("layers") or {}, cfg.model.arch)
    if all(acts == ["freeze"] for acts in space.group_actions().values()):
        raise UserError("search.layers: every layer group can only be 'freeze': nothing would train")
    return space


def _parse_layers(space: SearchSpace, layers, arch: str) -> None:
    """`search.layers`: the actions sampled for every group (`actions`) and per-group pins or sets, checked against
    the architecture's groups and the known actions."""
    if not isinstance(layers, dict):
        raise UserError("search.layers: expected a mapping of layer group -> action (and 'actions: [...]')")
    for key, value in layers.items():
        where = f"search.layers.{key}"
        if key != "actions" and key not in space.groups:
            raise UserError(f"{where}: unknown layer group{did_you_mean(key, [*space.groups, 'actions'])} of "
                            f"{arch}; groups: {', '.join(space.groups)}")
        acts = value if isinstance(value, list) else [value]
        if not acts:
            raise UserError(f"{where}: empty list of actions")
        for a in acts:
            if a not in ACTIONS:
                raise UserError(f"{where}: unknown action '{a}'{did_you_mean(a, ACTIONS)}; "
                                f"choose from: {', '.join(ACTIONS)}")
        if key == "actions":
            space.actions = list(acts)
        else:
            space.pinned_layers[key] = list(acts)


def _check_layer_term_keys(param: Param, pipeline_term: str) -> None:
    """`pipeline.layer_term` is the default of `search.layer_term`: set to something else beside it, one of the
    two would be silently ignored."""
    values = [param.value] if param.mode == "fixed" else param.choices
    if pipeline_term != "feature" and pipeline_term not in values:
        raise UserError(f"search.layer_term ({', '.join(map(str, values))}) leaves out pipeline.layer_term "
                        f"'{pipeline_term}': set the layer term in one place (search.layer_term replaces "
                        f"pipeline.layer_term, which is only its default)")


@pydantic.dataclasses.dataclass(config=SETTINGS)
class RangeSpec:
    """A range's keys in `search` (`{low, high, log?, step?, default?}`); its values are checked against the
    parameter's bounds by `_check_value`."""

    low: Any = None
    high: Any = None
    log: Bool = False  # sample on a log scale (needs low > 0)
    step: Annotated[Float | None, Field(gt=0)] = None  # None = continuous
    default: Any = None  # what `trial run` takes (None = low)


def _parse_param(name: str, spec: ParamSpec, value) -> Param:
    where = f"search.{name}"
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: empty list")
        return Param(name, "categorical", choices=[_check_value(where, spec, v) for v in value])
    if isinstance(value, dict):
        return _parse_range(name, spec, validate(RangeSpec, value, where))
    return Param(name, "fixed", value=_check_value(where, spec, value))


def _parse_range(name: str, spec: ParamSpec, rng: RangeSpec) -> Param:
    where = f"search.{name}"
    if spec.kind is bool:
        raise UserError(f"{where}: a yes/no choice takes true, false or [false, true], not a range")
    if spec.kind is str:
        raise UserError(f"{where}: takes one of {', '.join(spec.allowed())} or a list of them, not a range")
    if rng.low is None or rng.high is None:
        raise UserError(f"{where}: a range needs both low and high")
    low, high = _check_value(f"{where}.low", spec, rng.low), _check_value(f"{where}.high", spec, rng.high)
    if low > high:
        raise UserError(f"{where}: low ({low}) is greater than high ({high})")
    if rng.log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0")
    if rng.step is not None and rng.log:
        raise UserError(f"{where}: step and log cannot be combined")
    default = rng.default
    if default is not None:
        default = _check_value(f"{where}.default", spec, default)
        if not low <= default <= high:
            raise UserError(f"{where}.default: {default} is outside [{low}, {high}]")
    return Param(name, "range", value=default, low=low, high=high, log=rng.log, step=rng.step)


def _check_value(where: str, spec: ParamSpec, value):
    if spec.kind is str:
        allowed = spec.allowed()
        if value not in allowed:
            raise UserError(f"{where}: unknown value {value!r}{did_you_mean(str(value), allowed)}; "
                            f"choose from: {', '.join(allowed)}")
        return value
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if spec.kind is int and not float(value).is_integer():
        raise UserError(f"{where}: expected a whole number, got {value!r}")
    if not spec.low <= value <= spec.high:
        raise UserError(f"{where}: {value} is out of range [{spec.low:g}, {spec.high:g}]")
    return spec.kind(value)


def suggest_choices(trial, space: SearchSpace, replace_with: str) -> TrialChoices:
    """Sample one trial's choices with `trial.suggest_*` (see `resolve_choices` for which are sampled when)."""
    def pick_layer(group: str, actions: list) -> str:
        return trial.suggest_categorical(layer_param(group), actions) if len(actions) > 1 else actions[0]

    return resolve_choices(space, replace_with, lambda name: space.params[name].suggest(trial), pick_layer)


def resolve_choices(space: SearchSpace, replace_with: str, pick: Callable[[str], Any],
                    pick_layer: Callable[[str, list], str]) -> TrialChoices:
    """One trial's choices, in the table's order (`objectives.params.PARAMS`, the layer actions right after the
    recipe): each parameter taken with `pick(name)` and each layer group's action with `pick_layer(group, actions)`
    only when its activity rule says it matters given the choices before it, else its inactive value (its
    configured default unless the table names one). E.g. the KD and distill-stage choices only for the distill
    recipe, the temperature only when alpha > 0, the adapter rank only when some group is adapted."""
    taken: dict[str, Any] = {}
    for name, spec in PARAMS.items():
        if spec.is_active(taken, replace_with):
            taken[name] = pick(name)
        else:
            taken[name] = space.params[name].default() if spec.inactive is None else spec.inactive
        if name == "recipe":  # the order studies have always sampled in, so seeded studies replay the same trials
            taken.update({layer_param(g): pick_layer(g, acts) for g, acts in space.group_actions().items()})
    return TrialChoices.from_flat(taken)


def applicable_choices(space: SearchSpace, replace_with: str, flat: dict) -> set[str]:
    """The parameters a trial that ran with the recorded choices `flat` had a say in: `resolve_choices`' picks for
    those values (a conditional choice counts only where it applied: no layer term for the finetune recipe, no
    adapter rank without an adapted group)."""
    picked: set[str] = set()

    def pick(name: str):
        picked.add(name)
        return flat.get(name, space.params[name].default())

    resolve_choices(space, replace_with, pick, lambda g, acts: flat.get(layer_param(g), acts[0]))
    return picked


def active_params(space: SearchSpace, replace_with: str, choices: TrialChoices) -> list[str]:
    """The parameters that mattered to a trial with `choices`, in the search space's order: those
    `resolve_choices` takes for them (no temperature when alpha is 0, no slim width when nothing is slimmed, no
    KD choices for the finetune recipe). What a summary of the trial shows; the others held their defaults."""
    taken: list[str] = []

    def pick(name: str):
        taken.append(name)
        return getattr(choices, name)

    resolve_choices(space, replace_with, pick, lambda g, acts: choices.layers.get(g, acts[0]))
    return taken


def grid_space(space: SearchSpace) -> dict[str, list]:
    """GridSampler's search_space: every Optuna parameter name with the values to visit."""
    grid = {layer_param(g): acts for g, acts in space.group_actions().items() if len(acts) > 1}
    grid.update({n: prm.grid() for n, prm in space.params.items() if prm.mode != "fixed"})
    return grid
