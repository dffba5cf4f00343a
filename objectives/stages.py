"""The stages a recipe runs, where each sits on the step axis, and what data each trains on.

The step axis: each stage owns a fixed block of steps, one step per epoch, whether or not it uses them all:

    recipe distill:  finetune 1..F | distill F+1..F+D | retrain-1 F+D+1..F+D+R | retrain-2 ... | retrain-G
    recipe finetune: finetune 1..B, with B = F + D + G*R (the epoch budget of a distill trial with G generations)

with F, D, R = `pipeline.finetune_epochs`, `distill_epochs`, `retrain_epochs` and G = `generations`. So step s is
the same point of the pipeline in every trial of a study: a distill stage that stops early at its threshold leaves
the rest of its block empty and the next stage still starts at its own first step. A stage given 0 epochs by the
config is not run. Step 0 is the teacher, which is never reported to the pruner (it is not a candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

from models import InvalidChoice

from .layer_terms import layer_term_options
from .params import NO_TERM
from .settings import PipelineSettings, TrialChoices
from .tasks import TaskData
from .train import DataSource


@dataclass(frozen=True)
class Stage:
    """One stage of a trial's recipe and its block on the step axis."""

    name: str  # finetune | distill | retrain-<g>
    kind: str  # finetune (cross-entropy) | distill (continues the finetuned student) | generation (fresh student)
    first_step: int
    epochs: int
    generation: int = 0  # born-again generation (kind generation); 0 otherwise

    @property
    def last_step(self) -> int:
        """The last step of the stage's block."""
        return self.first_step + self.epochs - 1


def epoch_budget(pipeline: PipelineSettings, generations: int) -> int:
    """The last step of a trial with `generations` born-again generations: its most epochs of student training."""
    return pipeline.finetune_epochs + pipeline.distill_epochs + generations * pipeline.retrain_epochs


def plan_stages(pipeline: PipelineSettings, choices: TrialChoices) -> list[Stage]:
    """The stages `choices.recipe` runs, each with its fixed block of steps (see the module docstring)."""
    if choices.recipe == "finetune":
        blocks = [("finetune", "finetune", epoch_budget(pipeline, choices.generations), 0)]
    else:
        blocks = [("finetune", "finetune", pipeline.finetune_epochs, 0),
                  ("distill", "distill", pipeline.distill_epochs, 0)]
        blocks += [(f"retrain-{g}", "generation", pipeline.retrain_epochs, g)
                   for g in range(1, choices.generations + 1)]
    stages, step = [], 1
    for name, kind, epochs, generation in blocks:
        if epochs > 0:
            stages.append(Stage(name, kind, step, epochs, generation))
        step += epochs
    if not stages:
        raise InvalidChoice(f"recipe '{choices.recipe}' trains no stage: pipeline.finetune_epochs, distill_epochs "
                            f"and retrain_epochs (x search.generations) are all 0")
    return stages


def stage_sources(stage: Stage, task: TaskData, pipeline: PipelineSettings,
                  choices: TrialChoices) -> list[DataSource]:
    """The data a stage trains on, each source with the weight of its loss terms (sources with no data or no
    weight left out). The unlabelled target pool has only a KD term (no label exists), so it is used only when
    alpha > 0 (alpha 0 means no teacher signal), or when beta's term uses it (`dann`: its domain classifier's target
    examples, with no KD term at alpha 0)."""
    return [s for s in _candidate_sources(stage, task, pipeline, choices) if s.weight > 0 and len(s.data) > 0]


def _candidate_sources(stage: Stage, task: TaskData, pipeline: PipelineSettings,
                       choices: TrialChoices) -> list[DataSource]:
    labeled = DataSource("target_labeled", task.target_labeled, 1.0)
    unlabeled = DataSource("target_unlabeled", task.target_unlabeled, 1.0 if _uses_pool(choices) else 0.0,
                           labeled=False)
    source = DataSource("source", task.source_train, choices.source_weight)
    if stage.kind == "finetune":
        return [labeled, source]
    if stage.kind == "distill" or pipeline.retrain_on == "both":
        return [labeled, unlabeled, source]
    if pipeline.retrain_on == "target":
        return [labeled, unlabeled]
    return [DataSource("source", task.source_train, 1.0)]


def _uses_pool(choices: TrialChoices) -> bool:
    term = choices.layer_term
    return choices.alpha > 0 or (choices.beta > 0 and term not in ("", NO_TERM)
                                 and layer_term_options(term).uses_target_pool)


# Why a source contributes nothing: (no data, no weight).
_UNUSED = {
    "target_labeled": ("no labelled target images (task.target_labeled_per_class is 0)", ""),
    "target_unlabeled": ("the unlabelled target pool is empty",
                         "the unlabelled target pool is unused without KD (search.alpha is 0)"),
    "source": ("the source has no training images", "search.source_weight is 0"),
}


def check_stage_data(stages: list[Stage], task: TaskData, pipeline: PipelineSettings,
                     choices: TrialChoices) -> None:
    """Reject, before any training, a choice that leaves a stage with no data to train on, saying why."""
    for stage in stages:
        candidates = _candidate_sources(stage, task, pipeline, choices)
        if any(s.weight > 0 and len(s.data) > 0 for s in candidates):
            continue
        why = [_UNUSED[s.name][0 if len(s.data) == 0 else 1] for s in candidates]
        raise InvalidChoice(f"stage '{stage.name}' would train on no data: {'; '.join(why)}")
