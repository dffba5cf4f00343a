"""Import a user's function named as `package.module:function` (a model builder in `model.arch`, a dataset in
`task.name`), from the working directory or `PYTHONPATH`."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from .errors import UserError, first_line


def is_import_path(name: str) -> bool:
    """Whether `name` reads as `package.module:function` (not `torchvision:...` or `timm:...`)."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and module not in ("torchvision", "timm")


def load_callable(spec: str, key: str) -> Callable:
    """The function `spec` = `package.module:function`; a one-line UserError (prefixed with the config `key`)
    when the module cannot be imported or has no such callable. The working directory is searched first, as
    `python -m` does, so a module next to the config is found whichever script runs."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure importing user code is the user's to fix
        raise UserError(f"{key}: cannot import '{module_name}' for '{spec}' ({type(exc).__name__}: "
                        f"{first_line(exc)}); run from the directory that holds it or add it to PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: module '{module_name}' has no function '{attr}'")
    return fn


def source_fingerprint(fn: Callable) -> str:
    """A hash of the file that defines `fn` (part of cache keys: editing a user's builder or dataset function
    means a new teacher); '' when it has none."""
    import hashlib
    import inspect

    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        return ""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
