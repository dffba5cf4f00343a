"""Import a user's function named as `package.module:function` (a model builder in `model.arch`, a dataset in
`task.name`), from the working directory or `PYTHONPATH`.

Importing runs the module's code, and a config can come from a shared study storage, so only packages this
process was told to trust are imported: `allow_imports` sets them (the caller decides; distillstudy's CLI takes
them from `--allow-import` and $DISTILLSTUDY_ALLOW_IMPORTS, narrowed to those the study was created with).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from .errors import UserError, first_line

_allowed: frozenset[str] = frozenset()  # top-level packages `load_callable` may import


class ImportNotAllowed(UserError):
    """A `package.module:function` whose top-level package is not allowed in this process."""

    def __init__(self, message: str, package: str):
        super().__init__(message)
        self.package = package


def allow_imports(packages) -> None:
    """Let `load_callable` import modules of these top-level packages (and only these) from now on."""
    global _allowed
    _allowed = frozenset(packages)


def allowed_imports() -> frozenset[str]:
    """The top-level packages `load_callable` may import."""
    return _allowed


def top_package(spec: str) -> str:
    """`pkg` of `pkg.mod:function`."""
    return spec.partition(":")[0].split(".")[0]


def is_import_path(name: str) -> bool:
    """Whether `name` reads as `package.module:function` (not `torchvision:...` or `timm:...`)."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and module not in ("torchvision", "timm")


def load_callable(spec: str, key: str) -> Callable:
    """The function `spec` = `package.module:function`; a one-line UserError (prefixed with the config `key`)
    when the module cannot be imported or has no such callable, an ImportNotAllowed when its top-level package is
    not allowed (`allow_imports`). The working directory is searched first, as
    `python -m` does, so a module next to the config is found whichever script runs."""
    module_name, _, attr = spec.partition(":")
    if top_package(spec) not in _allowed:  # checked before anything of it is imported
        raise ImportNotAllowed(f"{key}: '{spec}' would import package '{top_package(spec)}', which is not allowed "
                               f"here", top_package(spec))
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
