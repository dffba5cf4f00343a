"""Tracking faults never stall, hang or break a study (worker processes, real `mlflow server`s, real SQLite stores):

- the server dies mid-study: the next trials run untracked after one warning, with no minutes of retries;
- the server hangs (SIGSTOP) and the worker gets SIGTERM: it exits 130 once `tracking.exit_wait` is up, dropping
  the writes still queued, the interrupted trial is FAIL with its reason and queued again;
- the artifact folder cannot be written (`chattr +i`: EPERM even for root), at start: one `error:` line, no
  traceback, no run left RUNNING; mid-study: one warning, the study reaches its total, no run left RUNNING; a
  teacher's run whose weights it refuses is closed as FAILED like a trial's;
- the disk fills up (a 1 MiB tmpfs in a user+mount namespace): one line saying so, no traceback, no trial left
  RUNNING.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow_server import mlflow_server
from tiny import TINY

REPO = Path(__file__).resolve().parents[3]
CLI = REPO / "cli.py"
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
SETS = [*TINY, "study.pruner.name=none", "study.pruner.kwargs={}"]
WARNING = "is unavailable"  # the one line a tracking outage prints
pytestmark = pytest.mark.slow  # worker processes, mlflow servers, signals: tens of seconds each


@pytest.fixture
def server(tmp_path, mlflow_template):
    """A fresh `mlflow server` on a free loopback port (its own session, so the test can stop or kill it all)."""
    root = tmp_path / "server"
    root.mkdir()
    with mlflow_server(root, template=mlflow_template) as (url, proc):
        yield url, proc


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DISTILLSTUDY_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _worker(tmp_path: Path, cache: str, name: str, tracking: str, n_trials: int, extra=()) -> subprocess.Popen:
    """A `study run` worker process; `cache`: the session's teacher cache (these tests are about tracking)."""
    sets = [*SETS, f"tracking.mlflow_uri={tracking}", f"pipeline.cache_dir={cache}",
            f"study.checkpoint_dir={tmp_path}/ck", *extra]
    args = [sys.executable, str(CLI), "study", "run", name, "--config", QUICKSTART, "--quiet",
            "--storage", f"sqlite:///{tmp_path}/optuna.db", "--n-trials", str(n_trials),
            *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=open(tmp_path / "out", "w"),
                            stderr=open(tmp_path / "err", "w"), start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float, tmp_path: Path) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"worker still running after {timeout} s:\n{(tmp_path / 'err').read_text()[-3000:]}")
    return rc, (tmp_path / "out").read_text() + (tmp_path / "err").read_text()


_storages: dict[Path, optuna.storages.RDBStorage] = {}


def _trials(tmp_path: Path, name: str):
    # One storage per file: opening one checks the schema's version (alembic), a cost paid on every poll otherwise.
    if tmp_path not in _storages:
        _storages[tmp_path] = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    return optuna.load_study(study_name=name, storage=_storages[tmp_path]).get_trials(deepcopy=False)


def _when(predicate, timeout: float, proc: subprocess.Popen, tmp_path: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the study or its storage is not created yet
            pass
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode} before {what}:\n{(tmp_path / 'err').read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _finished(tmp_path: Path, name: str) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in _trials(tmp_path, name))


def test_a_dead_server_mid_study_means_untracked_trials_after_one_warning(server, tmp_path, teacher_cache_dir):
    url, proc = server
    worker = _worker(tmp_path, teacher_cache_dir, "dead", url, 6)
    _when(lambda: _finished(tmp_path, "dead") >= 2, 300, worker, tmp_path, "2 finished trials")
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    # MLflow's defaults would retry each trial's run for about 4 minutes.
    rc, output = _wait(worker, 120, tmp_path)
    assert rc == 0 and "Traceback" not in output, output
    assert output.count(WARNING) == 1, output
    assert "tracking call failed" not in output, output
    trials = [t for t in _trials(tmp_path, "dead") if not t.user_attrs.get("skipped")]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert time.monotonic() - killed < 110


def test_sigterm_with_a_hung_server_exits_at_once_and_requeues_the_trial(server, tmp_path, teacher_cache_dir):
    url, proc = server
    # tracking.exit_wait: how long the stopping worker waits for its queued writes to the hung server (default 15).
    worker = _worker(tmp_path, teacher_cache_dir, "hung", url, 20,
                     extra=["pipeline.distill_epochs=4", "tracking.exit_wait=2"])
    _when(lambda: _finished(tmp_path, "hung") >= 1, 300, worker, tmp_path, "a finished trial")
    os.killpg(proc.pid, signal.SIGSTOP)  # accepts connections (the kernel's backlog), never answers
    time.sleep(2)
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rc, output = _wait(worker, 90, tmp_path)
    assert rc == 130 and "Traceback" not in output, output
    assert "MLflow writes still queued after 2 s were dropped (tracking.exit_wait)" in output, output
    assert time.monotonic() - sent < 15, output  # the 2 s wait, then the exit: not the 15 s default
    trials = _trials(tmp_path, "hung")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["failure"].startswith("interrupted"), \
        [(t.number, t.state.name, t.user_attrs.get("failure")) for t in trials]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert any(t.params == failed[0].params for t in waiting) or \
        any(t.system_attrs.get("fixed_params") == failed[0].params for t in waiting)
    assert not [t for t in trials if t.state.name == "RUNNING"]


def _immutable(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    chattr = shutil.which("chattr")
    done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if not done or done.returncode:
        pytest.skip(f"cannot make a folder unwritable here (chattr +i): {done.stderr.strip() if done else 'no chattr'}")


def _mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], check=False)


def _runs(tracking: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def test_an_unwritable_artifact_folder_at_start_is_one_error_line(tmp_path, teacher_cache_dir, mlflow_sqlite):
    tracking = mlflow_sqlite  # artifacts default to ./mlruns beside it
    _immutable(tmp_path / "mlruns")
    try:
        rc, output = _wait(_worker(tmp_path, teacher_cache_dir, "ro", tracking, 2), 300, tmp_path)
    finally:
        _mutable(tmp_path / "mlruns")
    assert rc == 2 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking") and "PermissionError" in lines[0], output
    assert not [r for r in _runs(tracking) if r.info.status == "RUNNING"]


def test_an_artifact_folder_unwritable_mid_study_means_one_warning_and_no_running_run(tmp_path, teacher_cache_dir,
                                                                                     mlflow_sqlite):
    tracking = mlflow_sqlite
    worker = _worker(tmp_path, teacher_cache_dir, "ro-mid", tracking, 4)
    _when(lambda: _finished(tmp_path, "ro-mid") >= 1, 300, worker, tmp_path, "a finished trial")
    experiments = [p for p in (tmp_path / "mlruns").iterdir() if p.name not in ("0", ".trash")]
    for p in experiments:
        _immutable(p)  # no new run can make its artifact folder
    try:
        rc, output = _wait(worker, 300, tmp_path)
    finally:
        for p in experiments:
            _mutable(p)
    assert rc == 0 and "Traceback" not in output, output
    assert output.count(WARNING) == 1 and "PermissionError" in output, output
    assert [t.state.name for t in _trials(tmp_path, "ro-mid")] == ["COMPLETE"] * 4
    runs = _runs(tracking)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("distillstudy.role") == "study"]
    assert parent.info.status == "FINISHED"


def test_a_teacher_run_whose_weights_are_refused_is_closed_not_left_running(tmp_path, teacher_cache_dir,
                                                                            monkeypatch, mlflow_sqlite):
    """In-process, so the order is certain: the teacher's run is created, then its weights meet an artifact folder
    that cannot be written. Like a trial's run, it is closed as FAILED, with the reason, not left RUNNING."""
    from mlflow import MlflowClient

    from objectives.device import resolve_device
    from objectives.pipeline import get_task
    from objectives.teacher import get_teacher
    from study.commands import create
    from study.tracking import make_tracker
    from study.workers.studies import load_study

    tracking = mlflow_sqlite
    storage = f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.chdir(tmp_path)  # the experiment keeps its artifacts in ./mlruns
    sets = [*SETS, "tracking.enabled=true", f"tracking.mlflow_uri={tracking}", "tracking.log_weights=best",
            f"pipeline.cache_dir={teacher_cache_dir}"]
    create(QUICKSTART, "teacher-ro", storage, sets, load_if_exists=False)
    study, config = load_study("teacher-ro", storage)
    device = resolve_device(config.pipeline.device)
    task = get_task(config.task, config.pipeline.seed, device)
    model, info = get_teacher("teacher", config.model.arch, config.model.width, task, config.model, config.pipeline,
                              device)
    tracker = make_tracker(config)
    tracker.start_study(study, config)
    (experiment,) = [p for p in (tmp_path / "mlruns").iterdir() if p.name not in ("0", ".trash")]
    _immutable(experiment)
    try:
        tracker.log_teacher(info, model)
        tracker.end_study(study)
    finally:
        _mutable(experiment)
    runs = MlflowClient(tracking).search_runs([experiment.name], "tags.`distillstudy.role` = 'teacher'")
    assert [r.info.status for r in runs] == ["FAILED"], [(r.info.run_name, r.info.status) for r in runs]
    assert "PermissionError" in runs[0].data.tags["distillstudy.failure"]


def test_a_full_disk_is_one_line_and_leaves_no_orphan_trial(tmp_path):
    """A study on a 1 MiB tmpfs (mounted in a private user+mount namespace, so no root on the host is needed) runs
    until its disk fills: the stage checkpoints and the Optuna SQLite file share it."""
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                                       capture_output=True, text=True)
    if not probe or probe.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.strip() if probe else 'no unshare'}")
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    keep.mkdir()
    sets = [*SETS, "tracking.enabled=false", f"pipeline.cache_dir={tmp_path}/cache", "study.n_trials=30",
            "study.checkpoint_dir=checkpoints"]  # on the small disk, beside the storage
    command = " ".join([sys.executable, str(CLI), "study", "run", "full", "--config", QUICKSTART, "--quiet",
                        *[f"--set '{s}'" for s in sets]])
    # The storage is copied out before the namespace, and its tmpfs, goes away.
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && cd {mnt} && {command}; rc=$?; "
              f"cp {mnt}/distillstudy.db {keep}/; exit $rc")
    done = subprocess.run([unshare, "-rm", "sh", "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    # --quiet leaves warnings (the tiny teacher is near chance) and the one error line.
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: the disk is full ("), output
    # No orphan: every trial left RUNNING is reclaimed by the next worker's heartbeat check (FAIL, queued again).
    from study.workers.storage import open_storage

    storage = open_storage(f"sqlite:///{keep}/distillstudy.db", heartbeat_interval=1, grace_period=1, max_retry=2)
    study = optuna.load_study(study_name="full", storage=storage)
    running = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    time.sleep(1.5)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert [t.state.name for t in trials if t.number in running] == ["FAIL"] * len(running)
    assert len([t for t in trials if t.state.name == "WAITING"]) >= len(running)
