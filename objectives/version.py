"""The code version that goes into cache keys and run tags: package version + a hash of the model and
pipeline sources, so editing the training code invalidates cached teachers."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`<version>+<hash of models/ and objectives/ sources>`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("distillstudy")
    except PackageNotFoundError:
        base = "0+unknown"
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("models", "objectives"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return f"{base}+{h.hexdigest()[:10]}"
