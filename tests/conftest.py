"""Shared fixtures: tiny, fast pipeline settings and one teacher cache per test session.

The tiny settings train every stage for one epoch on digits tasks capped to 300 images per domain, so a whole
trial takes about a second on one CPU core; the session-wide cache directory means each (task, arch, seed)
teacher is trained once and loaded by every later test.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"  # this machine's PostgreSQL: trust authentication


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Small models on tiny batches run fastest on one thread (and do not fight over the cores of a loaded machine).
    Set here, not when this file is imported: pytest-xdist's controller process runs no test, and importing torch
    there would hold up the start of every worker by seconds."""
    import torch

    torch.set_num_threads(1)


def _checkout_state() -> set[str] | None:
    """The untracked and ignored files of the checkout (`git status`: a stray distillstudy.db or mlruns/ is junk
    too, only hidden), less what running Python and pytest legitimately leave (bytecode, pytest's cache); None
    outside a git checkout. Edits to tracked files are left out: a developer may edit while the tests run."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    skip = ("__pycache__/", ".pytest_cache/", ".venv/", ".egg-info/")
    return {line for line in out.stdout.splitlines()
            if line.startswith(("??", "!!")) and not any(s in line for s in skip)}


def pytest_collection_modifyitems(config, items):
    """Modules with the most end-to-end (`slow`) tests are handed out first. `make test` gives whole modules to two
    worker processes in collection order, and a long module collected last would keep one worker busy alone at the
    end (at today's sizes the gain is within run-to-run noise). Order within a module is kept."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module's own order stays


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """A test run writes nothing into the checkout (stores, lock files, reports, runs): everything it makes lives in
    temporary folders. Compares `git status` at the end of the session with its start."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    if before is not None and after is not None:
        new = sorted(after - before)
        assert not new, f"the test run left these in the checkout: {new}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (for examples/ and other checked-in files)."""
    return REPO


@pytest.fixture(scope="session")
def teacher_cache_dir(tmp_path_factory) -> str:
    """One teacher/donor cache for the whole session: each teacher is trained once, then loaded. Under pytest-xdist
    the workers share it (their temporary folders have one parent): the cache's lock file lets one worker train a
    teacher while the others wait for it, as cluster workers do."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "teacher-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture
def tiny_pipeline(teacher_cache_dir):
    """Pipeline settings for a trial of seconds: 1 epoch per stage, CPU, one thread, the session's cache (the
    teacher settings of tests/tiny.py's TINY, so CLI tests share its teachers). Tests derive variants with
    `dataclasses.replace(tiny_pipeline, ...)`."""
    from objectives.settings import PipelineSettings

    return PipelineSettings(seed=0, device="cpu", batch_size=64, teacher_epochs=1, finetune_epochs=1,
                            distill_epochs=1, retrain_epochs=1, cache_dir=teacher_cache_dir, cpu_threads=1)


@pytest.fixture
def tiny_task():
    """`tiny_task(name)` -> TaskOptions of an offline task capped to 300 images per domain."""

    from objectives.tasks import TaskOptions

    def make(name: str = "digits-invert", **kwargs) -> TaskOptions:
        return dataclasses.replace(TaskOptions(name=name, max_per_domain=300), **kwargs)

    return make


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite store to copy (see tests/mlflow_server.py `migrated_store`), made once per
    run, shared by pytest-xdist workers. For stores whose creation a test is not about."""
    from mlflow_server import migrated_store

    base = tmp_path_factory.getbasetemp()
    return migrated_store(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture
def mlflow_sqlite(tmp_path, mlflow_template) -> str:
    """The URI of `tmp_path/mlflow.db`, a copy of the migrated template: for a test whose subject is not a store's
    creation (a new store migrates for about a second of CPU, more on a loaded machine). Experiments created in it
    keep their artifacts in ./mlruns, as in a new store; tests/study/tracking/test_tracking_lifecycle.py and
    test_bad_inputs.py start from no store at all."""
    from mlflow_server import copy_store

    return copy_store(mlflow_template, tmp_path)


@pytest.fixture(scope="session", autouse=True)
def default_tracking_store(tmp_path_factory, mlflow_template):
    """A test that leaves `tracking.mlflow_uri` unset tracks into a session-wide temporary store (`study create`
    opens the tracking store; a copy of the migrated template), never into an mlflow.db in the checkout."""
    from mlflow_server import copy_store

    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = copy_store(mlflow_template, tmp_path_factory.mktemp("mlflow"))
    yield


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL URL. Unreachable server: skip, but fail when $CI is set (CI must run these tests)."""
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001 - missing driver or server: both mean "no PostgreSQL here"
        reason = f"PostgreSQL at {PG_URL} unreachable: {type(exc).__name__}: {str(exc).strip()[:200]}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    return PG_URL


@pytest.fixture(autouse=True)
def no_user_imports_allowed():
    """Every test starts and ends with no user package allowed to be imported (models.imports.allow_imports is
    process-wide); a test of user modules allows its own (allow_imports, --allow-import or the variable)."""
    from models.imports import allow_imports

    allow_imports(())
    yield
    allow_imports(())
