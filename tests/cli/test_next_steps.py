"""A new user's next steps, as printed: the commands after a study (`mlflow ui`, `distillstudy ui`,
`optuna-dashboard`) run as they stand in a shell where the virtual environment is not active (`make demo` never
activates it), and `distillstudy ui` prints its address only once the server answers there."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow_server import free_port

from cli import main
from study.commands import QUICKSTART
from study.ui import runnable

START_LIMIT_S = 400  # `mlflow ui` has taken minutes to answer on a loaded 2-core machine
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.path.abspath(sys.executable)).parent
# A user's shell: the system's PATH, without this virtual environment's bin folder.
BARE_PATH = os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                            if p and Path(p).resolve() != VENV_BIN.resolve())


def test_runnable_names_the_environments_copy_unless_the_shell_finds_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", BARE_PATH)
    monkeypatch.chdir(VENV_BIN.parent.parent)  # the folder holding the venv, as after `make demo`
    assert runnable("mlflow") == f"{VENV_BIN.parent.name}/bin/mlflow"
    monkeypatch.chdir(tmp_path)  # elsewhere: the absolute path
    assert runnable("optuna-dashboard") == str(VENV_BIN / "optuna-dashboard")
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{BARE_PATH}")  # an active venv: the bare name runs
    assert runnable("mlflow") == "mlflow"
    assert runnable("no-such-tool-here") == "no-such-tool-here"


@pytest.mark.slow
def test_the_commands_printed_after_a_study_run_as_printed(tmp_path, teacher_cache_dir, monkeypatch, mlflow_sqlite):
    monkeypatch.setenv("PATH", BARE_PATH)
    monkeypatch.chdir(tmp_path)
    sets = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1",
            "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1",
            "search.generations=0", "study.baselines=false", "study.confirm.top=0", "study.pruner.name=none",
            "study.pruner.kwargs={}", f"pipeline.cache_dir={teacher_cache_dir}", "tracking.log_weights=none",
            "tracking.register_best=false", f"tracking.mlflow_uri={mlflow_sqlite}"]
    run = CliRunner().invoke(main, ["study", "run", "next", "--config", str(QUICKSTART), "--storage",
                                    f"sqlite:///{tmp_path / 's.db'}", "--n-trials", "1",
                                    *[a for s in sets for a in ("--set", s)]], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in run.stdout.splitlines()
             if line.startswith(("browse the trials:", "optuna dashboard:"))}
    mlflow_cmd = shlex.split(lines["browse the trials"].split("   then open ")[0])
    dashboard_cmd = shlex.split(lines["optuna dashboard"])
    assert mlflow_cmd[1:3] == ["ui", "--backend-store-uri"] and dashboard_cmd[1].endswith("s.db")
    assert "workflowType=machine_learning" in lines["browse the trials"]
    for executable in (mlflow_cmd[0], dashboard_cmd[0]):
        # What the shell would do with the word as printed: found on PATH, or a path that exists.
        proc = subprocess.run(f"{shlex.quote(executable)} --help", shell=True, capture_output=True, text=True,
                              env={**os.environ, "PATH": BARE_PATH}, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, (executable, proc.stderr[-500:])


@pytest.mark.slow
def test_ui_prints_its_address_once_it_answers(tmp_path, mlflow_sqlite):
    port = free_port()  # mlflow_sqlite: a migrated store, so the server starts without migrating
    env = {**os.environ, "PATH": BARE_PATH, "MLFLOW_TRACKING_URI": mlflow_sqlite}
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "ui", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(START_LIMIT_S, lambda: os.killpg(proc.pid, 9))  # readline must not hang the suite
    watchdog.start()
    try:
        first = proc.stdout.readline()  # blocks until the command prints its first line
        answered = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status
        second = proc.stdout.readline()
        served_by = _session_commands(proc.pid)
    finally:
        watchdog.cancel()
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments"), first + proc.stderr.read()
    assert "workflowType=machine_learning" in first
    assert answered == 200  # the address was printed only once the server answered
    assert second.startswith("Optuna dashboard: ") and str(VENV_BIN / "optuna-dashboard") in second, second
    # One server process (`--workers 1`, the default): no uvicorn worker processes forked beside it.
    assert not [c for c in served_by if "multiprocessing" in c], served_by
    assert [c for c in served_by if "--workers 1" in c], served_by


def _session_commands(sid: int) -> list[str]:
    """The command lines of the processes in session `sid` (from /proc: field 6 of `stat` is the session)."""
    commands = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                commands.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):  # a process that ended while being read
            pass
    return commands
