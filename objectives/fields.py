"""The field types the config's settings classes are declared with (pydantic v2), so each class validates itself.

A settings class is `@pydantic.dataclasses.dataclass(config=SETTINGS)`: still a dataclass (`dataclasses.replace`
and `asdict` work), but building it checks every key, type, range and choice. `study.config.validation` turns pydantic's
errors into one line naming the key's full path.

YAML is typed, so types are strict: `batch_size: true` or `compile: 1` is a slip, not a value to convert. The one
widening is int -> float (`lr: 1` means 1.0).
"""

from __future__ import annotations

import importlib
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError

SETTINGS = ConfigDict(extra="forbid")  # an unknown key is an error, never ignored


def _empty_if_none(empty):
    # `key:` with nothing after it is YAML's None: read as the empty value, as a user means it.
    return BeforeValidator(lambda value: empty() if value is None else value)


Int = Annotated[int, Strict()]  # a bool is rejected
Float = Annotated[float, Strict()]  # an int is accepted and stored as a float
Bool = Annotated[bool, Strict()]  # 1 and 0 are rejected
Text = Annotated[str, _empty_if_none(str), Strict()]
Mapping = Annotated[dict, _empty_if_none(dict), Strict()]
NONE_IS_EMPTY = _empty_if_none(dict)  # for a nested section: `augment:` alone keeps its defaults


def in_range(default, low, high):
    """A field whose value must lie in [low, high]."""
    return Field(default=default, ge=low, le=high)


def in_open_range(default, low, high):
    """A field whose value must lie in (low, high), both ends excluded."""
    return Field(default=default, gt=low, lt=high)


def registered(module: str, lister: str) -> AfterValidator:
    """A validator that accepts only the names `module.lister()` returns when it runs, so a newly registered name
    is valid with no edit here (the registry's module imports the settings, so it is imported only then)."""

    def check(value: str) -> str:
        choices = list(getattr(importlib.import_module(module), lister)())
        if value not in choices:
            raise PydanticCustomError("not_a_choice", "'{value}' is not one of {choices}",
                                      {"value": value, "choices": choices})
        return value

    return AfterValidator(check)
