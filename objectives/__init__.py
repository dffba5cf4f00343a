"""The transfer-and-distill pipeline: tasks, stages, losses and the training loop.

Knows nothing of Optuna beyond a `report(step, value, stage)` callback; `run_trial` is the whole pipeline.
Beta's layer terms and the replacement strategies are registries: `register_layer_term`, `register_replacement`.
"""

from . import dann  # noqa: F401,E402 - registers the built-in `dann` layer term, after feature and params
from .layer_terms import LayerTerm, LayerTermContext, list_layer_terms, register_layer_term
from .pipeline import TrialResult, run_trial
from .replacements import GroupToReplace, list_replacements, register_replacement
from .settings import ModelSettings, PipelineSettings, TrialChoices
from .tasks import TaskOptions

__all__ = ["GroupToReplace", "LayerTerm", "LayerTermContext", "ModelSettings", "PipelineSettings", "TaskOptions",
           "TrialChoices", "TrialResult", "list_layer_terms", "list_replacements", "register_layer_term",
           "register_replacement", "run_trial"]
