"""One way to turn a description of something into a short, stable key: cache entries (teachers, stage
checkpoints), a study's config identity and lock file names all hash the JSON of what determines them."""

from __future__ import annotations

import hashlib
import json


def stable_hash(obj: object, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `obj` as canonical JSON (keys sorted; what JSON cannot hold
    written as its `str`): equal descriptions give equal keys in every process and on every machine."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
