"""Which user modules a process may import: `package.module:function` in task.name, model.arch or model.donor_arch.

Importing a module runs its code, and a worker reads its study's config from the shared storage. So a user module
is imported only when its top-level package is allowed twice:

- on the machine that runs the command: `--allow-import PKG` (study create, study run, trial run) or
  $DISTILLSTUDY_ALLOW_IMPORTS=PKG,PKG2 (every command, e.g. `study report` of such a study);
- in the study: `study create` (or the creating `study run --config`) records the packages its config imports,
  as the study's user attribute `allow_imports`.

Trust model: whoever can write the study storage can change a stored config and that attribute, and so make a
worker import any module of the packages the worker's own operator allowed -- never any other. Built-in names
(registered models and tasks, torchvision:NAME, timm:NAME) need no opt-in.
"""

from __future__ import annotations

import os

from models.errors import UserError
from models.imports import allow_imports, allowed_imports, is_import_path, top_package

ENV = "DISTILLSTUDY_ALLOW_IMPORTS"
ATTR = "allow_imports"  # the study's user attribute: the packages it was created with
HOW = f"allow it with --allow-import {{pkg}} (or {ENV}={{pkg}})"


def grant(flags=()) -> frozenset[str]:
    """Allow this process to import the packages of `flags` (`--allow-import`, repeatable) and of the variable
    (comma-separated); returns them. Every command starts here, so nothing carries over between commands run in
    one process."""
    names = [*flags, *os.environ.get(ENV, "").split(",")]
    packages = frozenset(n.strip() for n in names if n.strip())
    allow_imports(packages)
    return packages


def imported_names(config: dict) -> dict[str, str]:
    """Config key -> `package.module:function` of every user import in a config (as plain data)."""
    task, model = config.get("task") or {}, config.get("model") or {}
    names = {"task.name": task.get("name"), "model.arch": model.get("arch"),
             "model.donor_arch": model.get("donor_arch")}
    return {k: v for k, v in names.items() if isinstance(v, str) and is_import_path(v)}


def packages_of(config: dict) -> list[str]:
    """The top-level packages a config imports, sorted (what a new study records)."""
    return sorted({top_package(v) for v in imported_names(config).values()})


def not_allowed(key: str, spec: str) -> UserError:
    """The error for `spec` in config `key`, whose package this process may not import."""
    pkg = top_package(spec)
    return UserError(f"{key}: '{spec}' imports package '{pkg}' from outside distillstudy; " + HOW.format(pkg=pkg))


def narrow_to_study(name: str, attrs: dict) -> None:
    """Before a stored config of study `name` (user attributes `attrs`) is read: a one-line UserError when it
    imports a package the study was not created with or this process does not allow; then only the study's
    packages stay allowed."""
    recorded = set(attrs.get(ATTR) or [])
    here = allowed_imports()
    for key, spec in imported_names(attrs.get("config") or {}).items():
        pkg = top_package(spec)
        if pkg not in recorded:
            raise UserError(f"study '{name}': {key} '{spec}' imports package '{pkg}', which the study was not "
                            f"created with (--allow-import {pkg} on study create); this worker refuses it")
        if pkg not in here:
            raise UserError(f"study '{name}': {key} '{spec}' imports package '{pkg}' from outside distillstudy; "
                            + HOW.format(pkg=pkg))
    allow_imports(here & recorded)
