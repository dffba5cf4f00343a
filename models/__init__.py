"""Architectures as ordered layer groups. Knows nothing of Optuna or the pipeline.

The names below load on first use (PEP 562): `models.errors` is imported by every layer and by the CLI before it
knows which command runs, and importing torch for `--help` or a one-line usage error costs seconds.
"""

from __future__ import annotations

import importlib

from .errors import InvalidChoice, UserError

_LAZY = {"GroupedModel": "grouped", "group_output_shapes": "grouped", "group_parameter_counts": "grouped",
         "create_model": "registry", "list_models": "registry", "register_model": "registry",
         "derive_seed": "seeding", "seeded_init": "seeding"}

__all__ = ["GroupedModel", "InvalidChoice", "UserError", "create_model", "derive_seed", "group_output_shapes",
           "group_parameter_counts", "list_models", "register_model", "seeded_init"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
