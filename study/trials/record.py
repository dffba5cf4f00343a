"""The trial record: everything distillstudy stores on an Optuna trial, written and read only here.

Optuna keeps what the sampler proposed (`trial.params`); the record, in the trial's user attributes, keeps what the
trial really ran and produced. Writers take the live `optuna.Trial` (or build the attributes of an enqueued one);
readers wrap a `FrozenTrial` in `TrialRecord`. Every choice has one name, its search parameter's: `layers.<group>`
for a layer group's action, else the `TrialChoices` field (`alpha`, `recipe`, ...); the same name is the Optuna
parameter, the MLflow param and the key in `choices`, and `--set` takes it as `search.<name>`.

Attributes (all optional until the trial gets there):
- identity: `choices` (flat, by name), `seed` (the run seed), `data_seed` (the seed of its data split and teacher:
  `pipeline.seed`, or a resampled confirmation run's own), `baseline` (its name), for a confirmation run
  `confirm_role`, `confirm_of_trial`, `confirm_choices`; `retry_of` for a re-queued trial and
  `requeues`, how many copies came before it;
- result: `stages` (stage -> accuracies on both domains, epochs, first step, teacher, sources), `best_stage` (the
  delivered stage) and `select`, `budget`, `total_epochs`, `epochs_to_threshold`, `student_params` (all of the
  delivered model's parameters), `trainable_params` (those the trial trained), `model_hash`, `layer_map`,
  `teacher_key`, `teacher_cache`, `data_fingerprint` (hash of the split data it trained and was scored on),
  `seconds`;
- outcome: `failure` (FAIL), `invalid_choice`, `pruned_at` (PRUNED), `skipped` (beyond the study's total);
- tracking: `mlflow_run_id`.
"""

from __future__ import annotations

from dataclasses import asdict

import optuna

from objectives.params import split_layers
from objectives.pipeline import TrialResult
from objectives.settings import TrialChoices

ACCURACIES = ("source_val_acc", "source_test_acc", "target_val_acc", "target_test_acc")
_LEGACY_PREFIX = "search."  # records written before choices took their parameter names


# ---- writing -----------------------------------------------------------------------------------------------------
def write_start(trial: optuna.Trial, choices: TrialChoices, seed: int, data_seed: int | None = None) -> None:
    """What the trial is about to run: its choices, run seed and data seed (default: the run seed, as for every
    trial of a study, whose seeds are both `pipeline.seed`)."""
    trial.set_user_attr("choices", choices.flat())
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("data_seed", seed if data_seed is None else data_seed)


def write_run_id(trial: optuna.Trial, run_id: str | None) -> None:
    """The trial's MLflow run (none when untracked)."""
    if run_id:
        trial.set_user_attr("mlflow_run_id", run_id)


def write_result(trial: optuna.Trial, result: TrialResult) -> None:
    """What the study commands and reports read back: per-stage accuracies, the delivered stage and the rule that
    chose it, sizes, epochs trained and the budget, the delivered weights' fingerprint, seconds."""
    attrs = {"stages": {k: asdict(v) for k, v in result.stages.items()}, "best_stage": result.best_stage,
             "select": result.select, "budget": result.budget, "model_hash": result.model_hash,
             "epochs_to_threshold": result.epochs_to_threshold, "student_params": result.student_params,
             "trainable_params": result.trainable_params, "total_epochs": result.total_epochs,
             "seconds": round(result.seconds, 3),
             "layer_map": result.layer_map, "teacher_key": result.teacher.key, "teacher_cache": result.teacher.cache,
             "data_fingerprint": result.data_fingerprint}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def write_failure(trial: optuna.Trial, reason: str, invalid_choice: bool = False) -> None:
    """Why the trial failed; `invalid_choice` when its choices could not run (not the worker's fault)."""
    trial.set_user_attr("failure", reason)
    if invalid_choice:
        trial.set_user_attr("invalid_choice", True)


def write_pruned(trial: optuna.Trial, reason: str, seconds: float) -> None:
    """Where and why the pruner stopped the trial."""
    trial.set_user_attr("pruned_at", reason)
    trial.set_user_attr("seconds", round(seconds, 3))


def write_skipped(trial: optuna.Trial, reason: str) -> None:
    """The trial was abandoned before it ran (the study already had its total)."""
    trial.set_user_attr("skipped", reason)


def baseline_attrs(name: str) -> dict:
    """The attributes an enqueued baseline starts with."""
    return {"baseline": name}


def confirm_attrs(role: str, of_trial: int, choices: TrialChoices, seed: int, data_seed: int,
                  baseline: str | None) -> dict:
    """The attributes an enqueued confirmation run starts with: which configuration, of which trial, on which run
    seed and data seed (its split and teacher)."""
    attrs = {"confirm_role": role, "confirm_of_trial": of_trial, "confirm_choices": choices.flat(), "seed": seed,
             "data_seed": data_seed}
    return {**attrs, **(baseline_attrs(baseline) if baseline else {})}


def requeue_attrs(record: TrialRecord) -> dict:
    """The attributes of a re-queued copy of an interrupted trial: what made it what it was (a baseline, a
    confirmation run and its seed), and which trial it retries."""
    keep = ("baseline", "confirm_role", "confirm_of_trial", "confirm_choices") + \
        (("seed", "data_seed") if record.confirm_role else ())
    return {"retry_of": record.number, "requeues": int(record.attrs.get("requeues") or 0) + 1,
            **{k: record.attrs[k] for k in keep if k in record.attrs}}


# ---- reading -----------------------------------------------------------------------------------------------------
class TrialRecord:
    """A read view of one trial's record (see the module docstring for the attributes)."""

    def __init__(self, trial: optuna.trial.FrozenTrial | optuna.Trial):
        # A live Trial (inside the objective) has no state or values yet.
        self.trial, self.attrs, self.number, self.params = trial, trial.user_attrs, trial.number, trial.params
        self.state, self.values = getattr(trial, "state", None), getattr(trial, "values", None)

    @property
    def choices(self) -> dict:
        """Every choice by name; a trial that recorded none (it failed before) falls back to Optuna's params."""
        flat = self.attrs.get("choices") or dict(self.params)
        return {k.removeprefix(_LEGACY_PREFIX): v for k, v in flat.items()}

    @property
    def layers(self) -> dict:
        """Layer group -> action."""
        return split_layers(self.choices)[0]

    @property
    def hyperparameters(self) -> dict:
        """Every choice but the layer actions."""
        return split_layers(self.choices)[1]

    def trial_choices(self) -> TrialChoices:
        """The choices the trial ran with, to run them again."""
        return TrialChoices.from_flat(self.choices)

    @property
    def confirm_choices(self) -> TrialChoices | None:
        """A confirmation run's enqueued choices (None for any other trial)."""
        flat = self.attrs.get("confirm_choices")
        return TrialChoices.from_flat({k.removeprefix(_LEGACY_PREFIX): v for k, v in flat.items()}) if flat else None

    def get(self, key: str, default=None):
        """A recorded attribute by its name in the module docstring."""
        return self.attrs.get(key, default)

    baseline = property(lambda self: self.attrs.get("baseline", ""))
    seed = property(lambda self: self.attrs.get("seed"))
    data_seed = property(lambda self: self.attrs.get("data_seed"))  # None: recorded before data seeds (pipeline.seed)
    stages = property(lambda self: self.attrs.get("stages") or {})
    best_stage = property(lambda self: self.attrs.get("best_stage"))
    failure = property(lambda self: self.attrs.get("failure"))
    skipped = property(lambda self: self.attrs.get("skipped"))
    invalid_choice = property(lambda self: bool(self.attrs.get("invalid_choice")))
    confirm_role = property(lambda self: self.attrs.get("confirm_role"))
    confirm_of_trial = property(lambda self: self.attrs.get("confirm_of_trial"))
    mlflow_run_id = property(lambda self: self.attrs.get("mlflow_run_id"))
    model_hash = property(lambda self: self.attrs.get("model_hash"))

    @property
    def delivered(self) -> dict:
        """The delivered model's four accuracies (None where the trial did not record them)."""
        stage = self.stages.get(self.best_stage, {})
        return {k: stage.get(k) for k in ACCURACIES}

    @property
    def delivered_recipe(self) -> str | None:
        """The recipe of the model the trial delivered: a distill-recipe trial whose pipeline.select picked its
        `finetune` stage delivered a fine-tuned model, never distilled, and counts as `finetune`."""
        recipe = self.choices.get("recipe")
        if recipe == "distill" and self.best_stage == "finetune":
            return "finetune"
        return recipe

    @property
    def delivered_note(self) -> str:
        """'finetune stage, not distilled' when the delivered model is not what the recipe names, else ''."""
        if self.delivered_recipe != self.choices.get("recipe"):
            return f"{self.best_stage} stage, not distilled"
        return ""

    @property
    def epochs(self) -> int:
        """Student epochs trained: recorded for a finished trial, else its reported steps."""
        return self.attrs.get("total_epochs", len(getattr(self.trial, "intermediate_values", {})))
