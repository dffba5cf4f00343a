"""The standard baselines every study runs beside its search (enqueued when the study is created)."""

from __future__ import annotations

from dataclasses import replace

from objectives.settings import TrialChoices

from .search import SearchSpace

BASELINES = {
    "finetune-all": "every group fine-tuned, no distillation (alpha 0)",
    "head-only": "only the head trained, every other group frozen, default distillation",
    "finetune-all-kd": "every group fine-tuned with the config's default distillation",
}


def baseline_choices(name: str, space: SearchSpace) -> TrialChoices:
    """The choices of baseline `name`: the space's defaults with the baseline's layer actions (and alpha)."""
    base = space.defaults()
    groups = space.groups
    if name == "finetune-all":
        return replace(base, layers={g: "finetune" for g in groups}, alpha=0.0, generations=0)
    if name == "head-only":
        return replace(base, layers={g: ("finetune" if g == groups[-1] else "freeze") for g in groups})
    if name == "finetune-all-kd":
        return replace(base, layers={g: "finetune" for g in groups})
    raise KeyError(name)


def enqueue_params(choices: TrialChoices, space: SearchSpace) -> dict:
    """Optuna parameter values for enqueue_trial: only the sampled parameters, and only values their
    distribution contains (the objective applies the full baseline choices either way)."""
    params = {}
    for g, acts in space.group_actions().items():
        if len(acts) > 1 and choices.layers[g] in acts:
            params[f"layers.{g}"] = choices.layers[g]
    for name, p in space.params.items():
        value = getattr(choices, name)
        if p.mode == "categorical" and value in p.choices:
            params[name] = value
        elif p.mode == "range" and p.low <= value <= p.high:
            params[name] = value
    return params
