"""The house rules a reader relies on (docs/architecture.md): imports flow one way, cli.py -> study/ ->
objectives/ -> models/, with Optuna and MLflow kept out of objectives/ and models/; and every function of study/
and objectives/ fits on a screen (60 lines), so it reads top to bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
# What each package may not import (a module or any of its submodules).
FORBIDDEN = {"objectives": ("cli", "study", "optuna", "mlflow"), "models": ("cli", "study", "objectives", "optuna",
                                                                            "mlflow")}


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in _sources(package)
             for name in sorted(_imported(ast.parse(path.read_text())))
             if name.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, wrong


@pytest.mark.parametrize("package", ["study", "objectives"])
def test_no_function_is_longer_than_a_screen(package):
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in _sources(package) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_no_room_of_study_imports_its_door():
    """study/'s rooms (its subpackages) never import the modules the CLI calls: commands, output, ui."""
    door = {"study.commands", "study.output", "study.ui"}
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in _sources("study") if path.parent != REPO / "study"
             for name in sorted(_imported(ast.parse(path.read_text())))
             if name in door or (name == "study" and _names_from_study(path) & {"commands", "output", "ui"})]
    assert not wrong, wrong


def _names_from_study(path: Path) -> set[str]:
    return {alias.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "study" for alias in node.names}
