"""A real `mlflow server` for the tests that need one: a free loopback port, a SQLite backend, artifacts proxied to
a local folder, its own session so that the test can stop (SIGSTOP) or kill all of it, and dying with the test
process however that ends (tests/server_process.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from server_process import start_server, stop_server

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether the server at `url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def migrated_store(template_dir: Path) -> Path:
    """An empty MLflow SQLite store with every schema migration applied, made once in `template_dir` (under a lock:
    pytest-xdist workers may ask together). Copying it is instant; migrating a fresh store takes seconds."""
    from filelock import FileLock
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = template_dir / "mlflow-template.db"
    with FileLock(template_dir / "mlflow-template.lock"):
        if not db.exists():
            tmp = template_dir / "mlflow-template.tmp.db"
            store = SqlAlchemyStore(f"sqlite:///{tmp}", str(template_dir / "unused-artifacts"))
            store.engine.dispose()
            os.replace(tmp, db)
    return db


def copy_store(template: Path, folder: Path) -> str:
    """`folder/mlflow.db`, a copy of the migrated `template` (see `migrated_store`); its tracking URI."""
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@contextlib.contextmanager
def mlflow_server(root: Path, *extra_args: str, env: dict | None = None, template: Path | None = None):
    """Start `mlflow server` with its store under `root` (a copy of `template`, a `migrated_store`, when given: the
    server then starts without migrating; `extra_args` and `env` added to its command and environment); yields
    (tracking URL, process: its guardian, whose pid is the server's process group). At the end the whole group is
    killed (woken first, should a test have stopped it); it dies with the test process too, even a SIGKILLed one."""
    if template is not None:
        copy_store(template, root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # No job-execution runner (a handful of huey consumers no test uses): the server starts much faster.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    proc = start_server([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                         "--artifacts-destination", str(root / "artifacts"), *extra_args],
                        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150  # ~15 s on an idle 2-core machine; much longer when it is loaded
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up (exit {proc.poll()}):\n"
                            f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_server(proc)  # the server's own process group: mlflow, uvicorn and anything they started
        log.close()
