"""Architectures as ordered layer groups. Knows nothing of Optuna or the pipeline."""

from .errors import InvalidChoice, UserError
from .grouped import GroupedModel, group_output_shapes, group_parameter_counts
from .registry import create_model, list_models, register_model
from .seeding import derive_seed, seeded_init

__all__ = ["GroupedModel", "InvalidChoice", "UserError", "create_model", "derive_seed", "group_output_shapes",
           "group_parameter_counts", "list_models", "register_model", "seeded_init"]
