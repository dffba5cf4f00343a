"""Test servers die with their test process: a `pytest` killed with SIGKILL (no cleanup of its own runs) leaves no
PostgreSQL or mlflow-like server behind, nor anything those servers started (tests/server_process.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Started by the inner pytest: the project's own PostgreSQL (a postmaster with its backends) and a server that
# starts a child of its own, as `mlflow server` starts uvicorn. It writes their process groups, then waits to be
# killed.
INNER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    import pytest

    sys.path.insert(0, {tests!r})
    from pg_server import own_postgres
    from server_process import start_server

    def test_servers():
        forking = start_server([sys.executable, "-c", "import subprocess, time; "
                                "subprocess.Popen(['sleep', '600']); time.sleep(600)"])
        with own_postgres() as pg:
            Path({out!r}).write_text(json.dumps({{"groups": [forking.pid, pg.proc.pid], "root": str(pg.root)}}))
            time.sleep(600)
""")


def _alive_in_groups(groups: set[int]) -> list[str]:
    """`pid command` of every live (not zombie) process whose process group is one of `groups`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        state, _ppid, pgid = text[name_end + 2:].split()[:3]
        if int(pgid) in groups and state != "Z":
            alive.append(f"{stat.parent.name} {text[text.index('(') + 1:name_end]}")
    return alive


def test_servers_die_with_a_sigkilled_pytest(tmp_path):
    out, groups, started = tmp_path / "groups.json", set(), {}
    (tmp_path / "test_inner.py").write_text(INNER.format(tests=str(TESTS), out=str(out)))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert inner.poll() is None, inner.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the inner test did not start its servers in 120 s"
            time.sleep(0.2)
        time.sleep(0.2)  # written in one call; let it land
        started = json.loads(out.read_text())
        groups = set(started["groups"])
        assert _alive_in_groups(groups), "the servers are not running"
    finally:
        inner.send_signal(signal.SIGKILL)
        inner.wait()

    deadline = time.monotonic() + 10
    while _alive_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_in_groups(groups), f"left running after pytest was killed: {_alive_in_groups(groups)}"
    shutil.rmtree(started["root"], ignore_errors=True)  # the PostgreSQL's files: the killed pytest left them
