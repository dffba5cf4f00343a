"""The one rule for study names. A name becomes a folder (`reports/<name>/`, checkpoints), an MLflow experiment,
a registered model (`<name>-best`) and a shell word in printed commands, so it is kept to characters that are safe
in all of them."""

from __future__ import annotations

import re

from models.errors import UserError

MAX_LENGTH = 100
# The companion study that confirms study `<name>` (study.confirm); it must obey the rule too.
COMPANION_SUFFIX = "-confirm"
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def rule(limit: int) -> str:
    """The rule in words, with the length limit that applies (a new study's is shorter: see check_study_name)."""
    return f"letters, digits, '-', '_' and '.', starting with a letter or digit, no '..', at most {limit} characters"


def check_study_name(name, creating: bool = False) -> str:
    """`name` when it follows the rule, else a one-line UserError quoting it. `creating`: the name of a new study,
    whose confirmation companion `<name>-confirm` must fit the length limit as well."""
    text = "" if name is None else str(name)
    shown = repr(text) if len(text) <= 60 else repr(text[:60]) + "..."
    limit = MAX_LENGTH - len(COMPANION_SUFFIX) if creating else MAX_LENGTH
    if not text:
        raise UserError(f"study name is empty; use {rule(limit)}")
    if len(text) > limit:
        why = f" (its confirmation study adds '{COMPANION_SUFFIX}')" if creating else ""
        raise UserError(f"study name {shown} is {len(text)} characters long: at most {limit}{why}")
    if not _ALLOWED.fullmatch(text) or ".." in text:
        raise UserError(f"study name {shown} is not allowed: use {rule(limit)}")
    return text
