"""Validate plain config data into a settings class (pydantic), and say what is wrong in one line.

pydantic reports an error as a location, a type and the bad input; the user reads the key's full path and what
it takes: `pipeline.lr: expected float, got str ('abc')`, `pipeline.batch_size: 0 is out of range [1, 65536]`,
`tracking.log_weights: 'some' is not one of all, best, none`, or an unknown key with the closest valid one.
"""

from __future__ import annotations

import functools
import typing

import pydantic

from models.errors import UserError, did_you_mean

_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")
# pydantic's error type for a wrong scalar -> the type named to the user
_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "dict_type": "dict", "list_type": "list"}


def validate(cls, data, path: str = ""):
    """Build the settings class `cls` (a pydantic dataclass) from `data`; a UserError naming `path`'s key if bad."""
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as exc:
        # A misspelled key is the error to show, not the required key it leaves missing.
        first = min(exc.errors(), key=lambda error: error["type"] not in _UNKNOWN_KEY)
        raise UserError(describe(cls, first, path)) from None


@functools.cache
def _adapter(cls) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def describe(cls, error: dict, path: str = "") -> str:
    """One line for one of pydantic's errors from validating `cls`: the key's full path, then what is wrong."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    where = _join(path, loc) or "config"
    if kind in _UNKNOWN_KEY:
        keys = list(_fields(_owner(cls, loc[:-1])))
        return f"{where}: unknown key{did_you_mean(loc[-1], keys)}; valid keys: {', '.join(keys)}"
    if kind in _TYPE_NAMES:
        return f"{where}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__} ({value!r})"
    if kind in ("dataclass_type", "dataclass_exact_type"):
        return f"{where}: expected a mapping, got {type(value).__name__}"
    if kind in ("literal_error", "not_a_choice"):
        choices = error["ctx"]["choices"] if kind == "not_a_choice" else \
            typing.get_args(_fields(_owner(cls, loc[:-1]))[loc[-1]].annotation)
        return f"{where}: '{value}' is not one of {', '.join(map(str, choices))}{did_you_mean(value, choices)}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{where}: {value} is out of range {_bounds(_fields(_owner(cls, loc[:-1]))[loc[-1]])}"
    return f"{where}: {error['msg']}"


def _join(path: str, loc: tuple) -> str:
    out = path
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else f"{out and '.'}{key}"
    return out


def _fields(cls) -> dict:
    return cls.__pydantic_fields__


def _owner(cls, loc: tuple):
    """The settings class holding the key at `loc` + one more key (nested sections are classes' fields)."""
    for key in loc:
        cls = _fields(cls)[key].annotation
    return cls


def _bounds(info) -> str:
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("ge", "le", "gt", "lt") if hasattr(m, name)}
    if "gt" in bounds and "lt" in bounds:  # both ends excluded (fractions that may be neither 0 nor 1)
        return f"({bounds['gt']:g}, {bounds['lt']:g}): both ends excluded"
    if "gt" in bounds:  # a step or a scale: above 0
        return f"({bounds['gt']:g}, inf)"
    return f"[{bounds['ge']}, {bounds['le']}]"
