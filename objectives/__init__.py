"""The transfer-and-distill pipeline: tasks, stages, losses and the training loop.

Knows nothing of Optuna beyond a `report(step, value, stage)` callback; `run_trial` is the whole pipeline.
"""

from .pipeline import TrialResult, run_trial
from .settings import ModelSettings, PipelineSettings, TrialChoices
from .tasks import TaskOptions

__all__ = ["ModelSettings", "PipelineSettings", "TaskOptions", "TrialChoices", "TrialResult", "run_trial"]
