"""A user module (`package.module:function` in task.name / model.arch) is imported only with an opt-in
(`--allow-import PKG` or $DISTILLSTUDY_ALLOW_IMPORTS), recorded in the study when it is created; a worker imports
only packages both the study and the worker allow. Without it: one `error:` line naming the flag, exit 2, nothing
created, and the module never imported. Built-in names need nothing."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from cli import main
from study.config.allowed_imports import ATTR, ENV

REPO = Path(__file__).resolve().parents[3]
# Importing it leaves a file behind: the proof that the module's code ran.
MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.flag").write_text("ran")
from examples.own_model import build, lit_digits  # noqa: E402,F401
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a user module (package `pkg`) and the repository on the path (for examples/)."""
    package = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{package}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(REPO), *sys.path])
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)
    yield package, tmp_path
    sys.modules.pop(package, None)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _sets(package: str, storage: str) -> list[str]:
    values = [f"task.name={package}:lit_digits", f"model.arch={package}:build", "tracking.enabled=false",
              f"study.storage={storage}"]
    return [a for v in values for a in ("--set", v)]


def test_without_the_opt_in_nothing_is_imported_or_created(workdir):
    package, tmp = workdir
    storage = f"sqlite:///{tmp / 's.db'}"
    config = str(REPO / "examples" / "own_model.yaml")
    for command in (["study", "create", config], ["study", "run", "--config", config, "--n-trials", "1"],
                    ["trial", "run", "--config", config]):
        result = cli(*command, *_sets(package, storage), "--allow-import", "somethingelse")
        assert result.exit_code == 2, result.output
        assert result.stderr == (f"error: task.name: '{package}:lit_digits' imports package '{package}' from outside "
                                 f"distillstudy; allow it with --allow-import {package} (or {ENV}={package})\n")
    assert not (tmp / "imported.flag").exists() and package not in sys.modules
    assert not (tmp / "s.db").exists()


def test_the_study_records_the_opt_in_and_its_workers_need_it_too(workdir, monkeypatch):
    package, tmp = workdir
    storage = f"sqlite:///{tmp / 's.db'}"
    created = cli("study", "create", REPO / "examples" / "own_model.yaml", "--name", "own",
                  *_sets(package, storage), "--allow-import", package)
    assert created.exit_code == 0, created.output
    assert created.output.rstrip().endswith(f"--allow-import {package}")  # the worker hint pastes as is
    study = optuna.load_study(study_name="own", storage=storage)
    assert study.user_attrs[ATTR] == [package]

    refused = cli("study", "status", "own", "--storage", storage)  # this process allows nothing
    assert refused.exit_code == 2 and f"allow it with --allow-import {package}" in refused.stderr
    monkeypatch.setenv(ENV, f"other, {package}")
    assert cli("study", "status", "own", "--storage", storage).exit_code == 0

    # Whoever can write the storage can change the study's record, but a worker never imports beyond its own
    # allowance, nor beyond the record.
    study.set_user_attr(ATTR, [])
    tampered = cli("study", "status", "own", "--storage", storage)
    assert tampered.exit_code == 2
    assert f"imports package '{package}', which the study was not created with" in tampered.stderr


def test_built_in_names_need_no_opt_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    result = cli("study", "create", REPO / "examples" / "quickstart.yaml", "--storage", f"sqlite:///{tmp_path}/s.db",
                 "--set", "tracking.enabled=false")
    assert result.exit_code == 0, result.output
    name = optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db")[0]
    assert optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/s.db").user_attrs[ATTR] == []


def test_deleting_a_study_imports_nothing(workdir):
    package, tmp = workdir
    storage = f"sqlite:///{tmp / 's.db'}"
    created = cli("study", "create", REPO / "examples" / "own_model.yaml", "--name", "own",
                  *_sets(package, storage), "--allow-import", package)
    assert created.exit_code == 0, created.output
    sys.modules.pop(package, None)
    (tmp / "imported.flag").unlink()
    deleted = cli("study", "delete", "own", "--storage", storage, "--yes")  # no opt-in in this command
    assert deleted.exit_code == 0, deleted.output
    assert not (tmp / "imported.flag").exists() and optuna.get_all_study_names(storage) == []
