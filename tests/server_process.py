"""Test servers (an `mlflow server`, a PostgreSQL) that die with the test process that started them, however it
ends: a finished or failed test, Ctrl-C, SIGTERM, or a SIGKILL of pytest that runs no cleanup at all.

`start_server(cmd)` runs this file as a guardian: the leader of a new process group (its own session) that starts
the server in that group. The guardian asks the kernel (prctl PR_SET_PDEATHSIG) for a SIGTERM when the process
that started it dies, and on SIGTERM (or SIGINT, SIGHUP) kills its whole group with SIGKILL: the server and
whatever it started (mlflow's uvicorn, PostgreSQL's backends). A server process itself cannot hold that wish for
its children: the kernel clears it on every fork. `stop_server` and an atexit hook kill the group on a normal exit.
The kernel sends that signal when the THREAD that started the guardian ends: start servers on the main thread.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time

_started: dict[int, subprocess.Popen] = {}  # guardian pid (= its process group) -> its Popen


def start_server(cmd: list[str], user: str | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start `cmd` (as `user`, when given) under a guardian; returns the guardian's Popen, whose pid is the process
    group to signal (os.killpg) to stop, pause or wake the server."""
    guardian = [sys.executable, os.path.abspath(__file__), str(os.getpid()), user or "", "--", *cmd]
    proc = subprocess.Popen(guardian, start_new_session=True, **popen_kwargs)
    _started[proc.pid] = proc
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Kill the server's whole process group (woken first, should it be stopped) and reap the guardian."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    _started.pop(proc.pid, None)


@atexit.register
def _stop_all() -> None:
    for proc in list(_started.values()):
        stop_server(proc, timeout=2)


# ---- the guardian (this file run as a script) ------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the wish was registered
        _kill_group()


def _kill_group(*_) -> None:
    os.killpg(0, signal.SIGKILL)  # this guardian goes too


def _main(argv: list[str]) -> int:
    parent, user, cmd = int(argv[0]), argv[1] or None, argv[3:]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _kill_group)
    _die_with_parent(parent)
    server = subprocess.Popen(cmd, user=user)
    while True:
        try:
            return server.wait()
        except InterruptedError:
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
