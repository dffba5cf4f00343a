"""`study run`: a worker. It runs trials until the study has its TOTAL of finished trials (COMPLETE or PRUNED),
so a resumed study or many parallel workers stop at exactly that number.

Stopping: the first Ctrl-C/SIGTERM interrupts the running trial, which is marked FAIL (and queued again with
the same parameters), its MLflow run closed as KILLED; the worker exits 130. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

import optuna

from models.errors import UserError

from .config import Config
from .storage import mask_url
from .objective import StudyFull, make_objective
from .studies import load_study

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A worker stops after this many FAIL trials in a row: something is wrong with it, not with the trials.
MAX_CONSECUTIVE_FAILURES = 5
# How often a worker with nothing left to start checks whether a running trial died and was re-queued.
_POLL_SECONDS = 2.0


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def make_tracker(config: Config):
    """The MLflow tracker, or a NullTracker when tracking is off."""
    from .tracking import NullTracker

    if not config.tracking.enabled:
        return NullTracker()
    from .mlflow_tracking import MlflowTracker

    return MlflowTracker(config)


def run_worker(name: str, url: str, n_trials: int | None = None, timeout: float | None = None, n_jobs: int = 1,
               device: str | None = None, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
               | None = None) -> optuna.Study:
    """Run trials of study `name` on `n_jobs` threads until it has `n_trials` finished trials (default: the
    config's `study.n_trials`) or `timeout` seconds have passed."""
    study, config = load_study(name, url, with_heartbeat=True)
    if device:
        config.pipeline.device = device
    total = n_trials or config.study.n_trials
    _preflight(config)
    config.study.storage = mask_url(url)  # what the tracker records as the study's storage
    if n_jobs > 1:
        _serialize_queue_pops(study)
    _lock_sqlite_queue_pops(study, url)
    tracker = make_tracker(config)
    tracker.start_study(study, config)
    stop, interrupted = threading.Event(), threading.Event()
    objective = make_objective(config, study, total, tracker, interrupted)
    deadline = time.monotonic() + timeout if timeout else None

    failures: list[str] = []  # reasons of the consecutive FAIL trials of this worker

    def callback(study_, trial):
        if trial.user_attrs.get("skipped"):
            return
        if on_trial:
            on_trial(study_, trial)
        if trial.state == optuna.trial.TrialState.FAIL and not interrupted.is_set():
            failures.append(trial.user_attrs.get("failure", "unknown reason"))
        else:
            failures.clear()
        if _count(study_, FINISHED) >= total or len(failures) >= MAX_CONSECUTIVE_FAILURES:
            stop.set()

    def loop():
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            finished = _count(study, FINISHED)
            if finished >= total:
                break
            running = _count(study, (optuna.trial.TrialState.RUNNING,))
            if finished + running >= total:
                # Others are running the last trials; stay until they end, in case one dies and is re-queued.
                optuna.storages.fail_stale_trials(study) if _heartbeat(study) else None
                waiting = _count(study, (optuna.trial.TrialState.WAITING,))
                if not waiting:
                    time.sleep(_POLL_SECONDS)
                    continue
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[callback])

    try:
        with _graceful_signals(interrupted, raise_now=n_jobs <= 1):
            if n_jobs <= 1:
                loop()
            else:
                threads = [threading.Thread(target=_guard(loop, stop), daemon=True) for _ in range(n_jobs)]
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)  # short joins keep the main thread responsive to signals
                if interrupted.is_set():
                    raise KeyboardInterrupt
    finally:
        tracker.end_study(study)
    if len(failures) >= MAX_CONSECUTIVE_FAILURES:
        raise UserError(f"{len(failures)} trials in a row failed on this worker (last: {failures[-1]}); "
                        f"stopping it so it does not burn through the study")
    return study


def _preflight(config: Config) -> None:
    # A worker that cannot run any trial (no CUDA, data not mounted) says so once, before it takes a trial.
    from objectives.device import resolve_device
    from objectives.pipeline import get_task

    get_task(config.task, config.pipeline.seed, resolve_device(config.pipeline.device))


def _serialize_queue_pops(study: optuna.Study) -> None:
    # Optuna pops an enqueued trial (a baseline, a retry) with a read, then a conditional write; SQLite ignores
    # SELECT ... FOR UPDATE, so two threads of one worker could pop the same trial, run it twice and crash on the
    # second tell ("Cannot tell a COMPLETE trial", optuna#4002). One lock per worker closes that between threads.
    pop, lock = study._pop_waiting_trial_id, threading.Lock()

    def locked_pop():
        with lock:
            return pop()

    study._pop_waiting_trial_id = locked_pop


def _lock_sqlite_queue_pops(study: optuna.Study, url: str) -> None:
    # The same race between worker PROCESSES on one SQLite file (two workers started together both ran the first
    # baseline): serialise their pops on a lock file beside the database.
    from .storage import _sqlite_path

    path = _sqlite_path(url)
    if path is None:
        return
    import fcntl

    pop, lock_path = study._pop_waiting_trial_id, f"{path.expanduser()}.queue.lock"

    def locked_pop():
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return pop()

    study._pop_waiting_trial_id = locked_pop


class _QuietSkips(logging.Filter):
    """Optuna logs every FAIL trial as a warning with its traceback. A trial abandoned because the study already has
    its total (a race between workers that the objective settles) is no error: drop its two warnings."""

    def __init__(self):
        super().__init__()
        self.skipped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        trial = record.getMessage().split(" failed with ", 1)[0]
        if record.exc_info and isinstance(record.exc_info[1], StudyFull):
            self.skipped.add(trial)
            return False
        return trial not in self.skipped


logging.getLogger("optuna.study._optimize").addFilter(_QuietSkips())


def _heartbeat(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def _guard(loop, stop: threading.Event):
    def run():
        try:
            loop()
        finally:
            stop.set()

    return run


class _graceful_signals:
    """SIGINT/SIGTERM set `interrupted` (trials on threads stop at their next epoch) and, with one thread, raise
    KeyboardInterrupt in the running trial at once. A second signal exits at once."""

    def __init__(self, interrupted: threading.Event, raise_now: bool):
        self.interrupted, self.raise_now = interrupted, raise_now

    def __enter__(self):
        self.count = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count > 1:
            os._exit(130)
        self.interrupted.set()
        if self.raise_now:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


__all__ = ["run_worker", "StudyFull"]
