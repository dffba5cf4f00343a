"""The next steps a user is shown: commands that run as printed, and `distillstudy ui`, which prints the MLflow UI's
address only once the server answers, as a link that lands on the study's runs table.

Two facts of the setting shape this. `make demo` never activates the virtual environment, so a bare `mlflow` or
`optuna-dashboard` is "command not found" in the user's shell: an executable of the environment this process runs
in is named by its path. And MLflow 3's UI picks its view per browser: it reads `workflowType` from the page's
query string, else the browser's saved choice, else GenAI (traces and evaluations; MLflow 3.17's
`WorkflowTypeProvider`). Only a link carrying `workflowType=machine_learning` opens a fresh browser on the runs
table (`tracking.view.experiment_url`, which also names the study's shared view with its columns); the experiment's
`mlflow.experimentKind` tag (`tracking.store.EXPERIMENT_KIND`) serves the MLflow versions that read it instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from study.tracking.view import SHARED_VIEW_TAG, experiment_url

START_TIMEOUT_S = 600  # a loaded machine has taken 86 s to bring `mlflow ui` up; past this it is not coming


def runnable(name: str) -> str:
    """How to type executable `name` so that it runs: its bare name when the shell finds this environment's copy
    (or the environment has none), else the path of this environment's copy, relative to the working directory when
    it lies below it (`.venv/bin/mlflow`)."""
    local = Path(os.path.abspath(sys.executable)).parent / name  # not resolved: a venv's python is a symlink
    if not local.is_file():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == local.resolve():
        return name
    try:
        relative = str(local.relative_to(Path.cwd()))
    except ValueError:
        return str(local)
    return relative if os.sep in relative else f".{os.sep}{relative}"


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _experiment(base: str, name: str) -> tuple[str | None, bool]:
    """Experiment `name`'s id, asked of the running server, and whether it holds the study's shared view (None and
    False when it has no such experiment yet)."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?{query}", timeout=10) as r:
            experiment = json.load(r)["experiment"]
    except (OSError, ValueError, KeyError):
        return None, False
    return experiment["experiment_id"], any(t.get("key") == SHARED_VIEW_TAG for t in experiment.get("tags", []))


def wait_until_answers(proc: subprocess.Popen, base: str, timeout: float = START_TIMEOUT_S) -> bool:
    """Poll `base` until the server answers, with a spinner on a terminal; False when `proc` exits or the time runs
    out first."""
    from tqdm import tqdm

    frames = "|/-\\"
    with tqdm(total=None, bar_format="{desc} {elapsed}", desc="starting the MLflow UI", file=sys.stderr,
              disable=not sys.stderr.isatty(), leave=False) as spinner:
        started = time.monotonic()
        while not _answers(base):
            if proc.poll() is not None or time.monotonic() - started > timeout:
                return False
            spinner.set_description_str(f"starting the MLflow UI {frames[int(time.monotonic() * 4) % 4]}")
            time.sleep(0.25)
    return True


def start_ui(uri: str, experiment: str, host: str, port: int, dashboard_storage: str, echo, workers: int = 1) -> int:
    """Run `mlflow ui` on tracking URI `uri` with `workers` server processes until Ctrl-C; once it answers, print
    the link to `experiment`'s runs and the optuna-dashboard command for `dashboard_storage` (a masked URL or
    journal path)."""
    from study.workers.storage import mask_url

    mlflow = str(Path(os.path.abspath(sys.executable)).parent / "mlflow")
    mlflow = mlflow if os.path.isfile(mlflow) else (shutil.which("mlflow") or "mlflow")
    # The server's own chatter on stderr: stdout carries only the lines below, the address once it is true.
    try:
        chatter = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr (Click's test runner) has no file
        chatter = None
    # MLflow 3's job runner (huey consumers for GenAI evaluation jobs, each a process importing MLflow) serves nothing
    # a runs table needs and slows the start; a user who wants it sets the variable to true.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                              "false")}
    # One server process by default: one user browses the runs, and each of MLflow's default 4 imports all of MLflow
    # (seconds of CPU each, on a laptop that may be running trials).
    proc = subprocess.Popen([mlflow, "ui", "--host", host, "--port", str(port), "--workers", str(workers),
                             "--backend-store-uri", uri],
                            stdout=chatter, env=env)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        if not wait_until_answers(proc, base):
            if proc.poll() is None:
                proc.terminate()
            echo(f"error: the MLflow UI did not answer at {base} (exit {proc.wait()})", err=True)
            return 1
        shown = f"http://{host}:{port}"
        experiment_id, with_view = _experiment(base, experiment)
        echo(f"MLflow UI: {experiment_url(shown, experiment_id, with_view)}  "
             f"(tracking URI {mask_url(uri)}; Ctrl-C to stop)")
        echo(f"Optuna dashboard: {runnable('optuna-dashboard')} {dashboard_storage}")
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0
