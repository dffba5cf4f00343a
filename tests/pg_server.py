"""A PostgreSQL instance of the test's own (never the shared server on 5432): `initdb` into a temporary folder, the
server on a free loopback port, stopped and started again at will (a restart), killed with its test process
(tests/server_process.py).

initdb refuses to run as root: then the cluster belongs to the `postgres` system user, who runs the server. Without
the binaries the tests skip, except with $CI set, where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow_server import free_port
from server_process import start_server, stop_server


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    return Path(found[-1]).parent if found[-1] else None


class OwnPostgres:
    """One PostgreSQL cluster in a temporary folder: `url`, `start()`, `stop()` (a fast shutdown, as a restart
    does), `close()` (kill it and delete its files)."""

    def __init__(self, bin_dir: Path, user: str | None):
        self.bin, self.user = bin_dir, user
        self.root = Path(tempfile.mkdtemp(prefix="distillstudy-pg-"))  # not under pytest's root-only tmp folders
        self.data, self.port = self.root / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        if user:
            os.chown(self.root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], user=user, check=True, capture_output=True, timeout=120)

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it takes connections."""
        with open(self.log, "ab") as log:
            self.proc = start_server([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                      "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                      "-c", "max_connections=50"], user=self.user, stdout=log,
                                     stderr=subprocess.STDOUT)
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not come up (exit {self.proc.poll()}):\n{self.log.read_text()}")
                time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        """A fast shutdown (SIGINT to the postmaster: clients are disconnected, as in a restart)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        self.proc.wait(timeout=timeout)  # the guardian ends with its server

    def close(self) -> None:
        """Stop the server at once (SIGQUIT: its backends quit and are reaped), kill whatever is left of its
        process group, delete its files."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)
                self.proc.wait(timeout=10)
        if self.proc is not None:
            stop_server(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to own a PostgreSQL cluster")
    return "postgres"


@contextlib.contextmanager
def own_postgres():
    """A started OwnPostgres, killed and deleted at the end. Skips (fails with $CI) without PostgreSQL's
    binaries."""
    bin_dir = _bin_dir()
    if bin_dir is None or not (bin_dir / "postgres").exists():
        reason = "PostgreSQL's initdb/postgres binaries are not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    server = OwnPostgres(bin_dir, _user())
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def fresh_postgres_database(admin_url: str):
    """A new, empty PostgreSQL database on the test server; yields its URL, drops it afterwards (MLflow keeps
    pooled connections to it in this process: FORCE closes them)."""
    import psycopg

    name = f"distillstudy_reg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
