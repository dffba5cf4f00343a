"""The standard baselines every study runs beside its search (enqueued when the study is created)."""

from __future__ import annotations

from dataclasses import replace

from objectives.params import layer_param
from objectives.settings import TrialChoices
from study.space.search import SearchSpace, active_params

# Each baseline's recipe, at the same epoch budget as a default trial (the default number of generations).
BASELINES = {
    "finetune-all": "every group fine-tuned with cross-entropy on the labelled target subset plus the source "
                    "(by source_weight) for the whole budget; no teacher signal, no unlabelled pool",
    "head-only": "the same recipe with only the last group trained, every other group frozen (a linear probe)",
    "finetune-all-kd": "every group fine-tuned, then distilled and re-distilled with the config's default alpha, "
                       "T and generations (the default recipe)",
}


def baseline_choices(name: str, space: SearchSpace) -> TrialChoices:
    """The choices of baseline `name`: the space's defaults with the baseline's recipe and layer actions."""
    groups = space.groups
    finetune_all = {g: "finetune" for g in groups}
    head_only = {g: ("finetune" if g == groups[-1] else "freeze") for g in groups}
    if name == "finetune-all":
        return replace(space.defaults(recipe="finetune"), layers=finetune_all)
    if name == "head-only":
        return replace(space.defaults(recipe="finetune"), layers=head_only)
    if name == "finetune-all-kd":
        return replace(space.defaults(recipe="distill"), layers=finetune_all)
    raise KeyError(name)


def enqueue_params(choices: TrialChoices, space: SearchSpace, replace_with: str) -> dict:
    """Optuna parameter values for enqueue_trial: only the parameters the search samples for these choices (a
    conditional one only where it applies: no KD choice for the finetune recipe; see `search.resolve_choices`), and
    only values their distribution contains (the objective applies the full choices either way)."""
    params = {}
    for g, acts in space.group_actions().items():
        if len(acts) > 1 and choices.layers[g] in acts:
            params[layer_param(g)] = choices.layers[g]
    active = set(active_params(space, replace_with, choices))
    for name, p in space.params.items():
        if name not in active:
            continue
        value = getattr(choices, name)
        if p.mode == "categorical" and value in p.choices:
            params[name] = value
        elif p.mode == "range" and p.low <= value <= p.high:
            params[name] = value
    return params
