"""Every searchable choice, declared once: its name, type, hard bounds, default search, default value and when it
is sampled (its activity rule). `TrialChoices` takes its defaults from here, `study.space.search` builds the search
space and resolves a trial's choices from here, and every summary that hides an unused choice asks
`ParamSpec.is_active`.

A layer group's action is the one choice per group named `layers.<group>`: `layer_param` builds that name and
`layer_group` reads it back; no other module spells the prefix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .replacements import get_replacement

# adapt: the group frozen (teacher weights, BatchNorm statistics untouched) and a zero-initialised residual adapter
# inserted after it and trained (`models.adapters`).
ACTIONS = ("freeze", "finetune", "replace", "adapt")
# distill: finetune -> distill -> born-again generations; finetune: one cross-entropy stage for the same epoch budget,
# no teacher signal (the recipe of the finetune-all and head-only baselines).
RECIPES = ("distill", "finetune")
NO_TERM = "none"  # search.layer_term / pipeline.layer_term: no layer term (beta is then not sampled)
_LAYER_PREFIX = "layers."


def layer_param(group: str) -> str:
    """The one name of a layer group's action: the Optuna parameter, the MLflow param and the recorded choice."""
    return f"{_LAYER_PREFIX}{group}"


def layer_group(name: str) -> str | None:
    """The layer group a choice's name is the action of (`layers.head` -> `head`); None for any other choice."""
    return name[len(_LAYER_PREFIX):] if name.startswith(_LAYER_PREFIX) else None


def split_layers(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat choices split into (layer group -> action, every other choice by name)."""
    layers = {layer_group(k): v for k, v in flat.items() if layer_group(k) is not None}
    return layers, {k: v for k, v in flat.items() if layer_group(k) is None}


def recorded(choices: Mapping[str, Any], name: str) -> Any:
    """A choice from a trial's flat choices, else its default value (a record may predate the choice)."""
    return choices[name] if name in choices else PARAMS[name].scalar()


def _layer_term_choices() -> list[str]:
    # The layer-term registry imports the settings, which import this table: it is read only when validating.
    return importlib.import_module("objectives.layer_terms").layer_term_choices()


# ---- activity rules: rule(choices taken so far, replace_with) -> sampled? --------------------------------------------
Rule = Callable[[Mapping[str, Any], str], bool]


def _always(choices: Mapping[str, Any], replace_with: str) -> bool:
    return True


def _distills(choices: Mapping[str, Any], replace_with: str) -> bool:
    """The KD and distill-stage choices matter only to the distill recipe."""
    return recorded(choices, "recipe") == "distill"


def _has_kd(choices: Mapping[str, Any], replace_with: str) -> bool:
    """T only shapes the KD term, which alpha 0 switches off."""
    return _distills(choices, replace_with) and recorded(choices, "alpha") > 0


def _has_layer_term(choices: Mapping[str, Any], replace_with: str) -> bool:
    return _distills(choices, replace_with) and choices.get("layer_term", NO_TERM) != NO_TERM


def _layer_actions(choices: Mapping[str, Any]) -> list[str]:
    return list(split_layers(choices)[0].values())


def _slims(choices: Mapping[str, Any], replace_with: str) -> bool:
    """The slim width sizes only the replaced groups of a slim-using replacement strategy."""
    return bool(replace_with) and get_replacement(replace_with).uses_slim_width and \
        "replace" in _layer_actions(choices)


def _adapts(choices: Mapping[str, Any], replace_with: str) -> bool:
    return "adapt" in _layer_actions(choices)


@dataclass(frozen=True)
class ParamSpec:
    """A searchable choice: its type, the bounds any value must respect, its default search (a range mapping, a list
    of values or a pin; None: set elsewhere, see `scalar`), and when it is sampled: `active(choices so far,
    replace_with)`, else it takes `inactive` (None: its configured default)."""

    kind: type
    low: float
    high: float
    default: Any
    help: str
    values: tuple | Callable[[], list] = ()  # the allowed values of a str choice (a function: a registry's names)
    active: Rule = _always
    inactive: Any = None

    def allowed(self) -> list:
        """The allowed values of a str choice, read now (a registry may have gained one)."""
        return list(self.values() if callable(self.values) else self.values)

    def scalar(self) -> Any:
        """The value `trial run` takes with no `search` entry: the range's default (else its low end), the list's
        first element, or the pin; '' for no default search (the layer term: the pipeline's, resolved per trial)."""
        if isinstance(self.default, dict):
            return self.kind(self.default.get("default", self.default["low"]))
        if isinstance(self.default, list):
            return self.default[0]
        return "" if self.default is None else self.default

    def is_active(self, choices: Mapping[str, Any], replace_with: str = "") -> bool:
        """Whether this choice is sampled (and so matters) given the trial's other choices, by name."""
        return self.active(choices, replace_with)


# One line per parameter: type, hard bounds, default search, help, activity rule. The order is the sampling order
# (the layer actions come right after the recipe): changing it changes what a seeded study samples.
PARAMS: dict[str, ParamSpec] = {
    # Both searched by default: the finetune-all and head-only baselines' recipe is a point the search can reach.
    "recipe": ParamSpec(str, 0, 0, list(RECIPES), "distill (finetune, distill, born-again generations) or finetune "
                        "(cross-entropy only, for the same epoch budget)", values=RECIPES),
    # The finetune recipe has no teacher signal: alpha 0, no layer term, beta 0.
    "alpha": ParamSpec(float, 0.0, 1.0, {"low": 0.0, "high": 1.0, "default": 0.5},
                       "weight of the KD term (1 - alpha on the label term; sampled only for the distill recipe)",
                       active=_distills, inactive=0.0),
    "temperature": ParamSpec(float, 0.05, 100.0, {"low": 1.0, "high": 8.0, "default": 4.0},
                             "KD temperature T (sampled only when alpha > 0)", active=_has_kd),
    # Default: pipeline.layer_term, pinned (see study.space.search.parse_search).
    "layer_term": ParamSpec(str, 0, 0, None, "beta's term: none, feature, params, dann or another registered one "
                            "(sampled only for the distill recipe)", values=_layer_term_choices,
                            active=_distills, inactive=NO_TERM),
    "beta": ParamSpec(float, 0.0, 1000.0, {"low": 0.0, "high": 1.0, "default": 0.0},
                      "weight of the layer term (sampled only when there is one)", active=_has_layer_term,
                      inactive=0.0),
    "threshold": ParamSpec(float, 0.0, 1.0, {"low": 0.8, "high": 1.0, "default": 0.95},
                           "a distill stage stops at this target validation accuracy", active=_distills),
    "lr": ParamSpec(float, 1e-7, 10.0, {"low": 3e-4, "high": 1e-2, "log": True, "default": 3e-3}, "learning rate"),
    "source_weight": ParamSpec(float, 0.0, 100.0, [0.5, 0.0, 1.0], "weight of the source data's loss terms"),
    # The finetune recipe trains the epoch budget of the default number of generations.
    "generations": ParamSpec(int, 0, 20, {"low": 0, "high": 2, "default": 1}, "born-again generations",
                             active=_distills),
    "slim_width": ParamSpec(float, 0.01, 1.0, [0.5, 0.25],
                            "width of slim replacements (sampled only when a group is replaced with slim)",
                            active=_slims),
    "adapter_rank": ParamSpec(int, 1, 4096, [8, 2, 32], "rank of the residual adapters (sampled only when a group "
                              "is adapted)", active=_adapts),
    "augment": ParamSpec(bool, 0, 1, [False, True], "augment training batches"),
}
