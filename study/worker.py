"""`study run`: a worker. It runs trials until the study has its TOTAL of finished trials (COMPLETE or PRUNED),
so a resumed study or many parallel workers stop at exactly that number.

Stopping: the first Ctrl-C/SIGTERM interrupts the running trial, which is marked FAIL (and queued again with
the same parameters), its MLflow run closed as KILLED; the worker exits 130. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import optuna

from models.errors import UserError, first_line

from . import compat, faults
from .config import Config
from .confirm import is_companion
from .objective import make_objective, requeue
from .record import TrialRecord
from .storage import mask_url
from .studies import load_study
from .tracking import make_tracker

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A worker stops after this many FAIL trials in a row: something is wrong with it, not with the trials.
MAX_CONSECUTIVE_FAILURES = 5
# Sampled choices that cannot run (a stage with no data, say) are the search space's fault, and a few are expected
# where only some values of a choice are impossible; this many in a row means the space can hardly produce any.
MAX_CONSECUTIVE_INVALID = 20
# How often a worker with nothing left to start checks whether a running trial died and was re-queued.
_POLL_SECONDS = 1.0


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def run_worker(name: str, url: str, n_trials: int | None = None, timeout: float | None = None, n_jobs: int = 1,
               device: str | None = None, on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
               | None = None, loaded: tuple[optuna.Study, Config] | None = None) -> optuna.Study:
    """Run trials of study `name` on `n_jobs` threads until it has `n_trials` finished trials (default: the
    config's `study.n_trials`) or `timeout` seconds have passed. `loaded`: the study (loaded with heartbeats, as
    `load_study(..., with_heartbeat=True)` does) and its config, when the caller has them already."""
    study, config = loaded or load_study(name, url, with_heartbeat=True)
    if device:
        config = config.with_changes("pipeline", device=device)
    total = n_trials or config.study.n_trials
    _preflight(config)
    config = config.with_changes("study", storage=mask_url(url))  # what the tracker records as the storage
    _lock_queue_pops(study, url)
    tracker = make_tracker(config)
    tracker.start_study(study, config, total)
    stop, interrupted = threading.Event(), threading.Event()
    objective = make_objective(config, study, total, tracker, interrupted)
    deadline = time.monotonic() + timeout if timeout else None

    failures: list[str] = []  # reasons of the consecutive FAIL trials of this worker
    disk_full: list[str] = []  # why this worker stopped on a full disk (a trial's reason or a storage error)
    started: list[optuna.Trial] = []  # this worker's trials: one left RUNNING is closed on a full disk
    invalid: list[str] = []  # reasons of the consecutive trials whose choices could not run

    def callback(study_, trial):
        r = TrialRecord(trial)
        if r.skipped:
            return
        if on_trial:
            on_trial(study_, trial)
        if trial.state == optuna.trial.TrialState.FAIL and faults.is_disk_full(Exception(r.failure or "")):
            disk_full.append(r.failure)  # every next trial would fail the same way
            stop.set()
        if r.invalid_choice:  # says nothing about this worker
            invalid.append(r.failure)
        elif trial.state == optuna.trial.TrialState.FAIL and not interrupted.is_set():
            failures.append(r.failure or "unknown reason")
            invalid.clear()
        else:
            failures.clear()
            invalid.clear()
        if _count(study_, FINISHED) >= total or len(failures) >= MAX_CONSECUTIVE_FAILURES \
                or len(invalid) >= MAX_CONSECUTIVE_INVALID:
            stop.set()

    queue_only = is_companion(study)  # a confirmation study ends when its queue is empty

    def loop():
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            finished = _count(study, FINISHED)
            if finished >= total:
                break
            running = _count(study, (optuna.trial.TrialState.RUNNING,))
            if queue_only or finished + running >= total:
                # Others are running the last trials; stay until they end, in case one dies and is re-queued.
                if compat.heartbeat_enabled(study):
                    optuna.storages.fail_stale_trials(study)
                waiting = _count(study, (optuna.trial.TrialState.WAITING,))
                if not waiting:
                    if queue_only and not running:
                        break
                    time.sleep(_POLL_SECONDS)
                    continue
            try:
                study.optimize(_recording(objective, started), n_trials=1, catch=(Exception,),
                               callbacks=[callback])
            except Exception as exc:  # noqa: BLE001 - Optuna could not write to its storage
                if not faults.is_disk_full(exc):
                    raise
                cause = faults.disk_full_cause(exc)
                disk_full.append(f"{type(cause).__name__}: {first_line(cause)}")
                stop.set()

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
        if interrupted.is_set():
            # Bounded wait; a second signal already exits at once (see _graceful_signals.__exit__).
            tracker.end_study(study, interrupted=True)
        else:
            # A Ctrl-C while the last tracking writes finish must not drop them, nor pass for an interrupted
            # trial: the first is absorbed, a second exits at once.
            with _graceful_signals(threading.Event(), raise_now=False):
                tracker.end_study(study)
    if disk_full:
        left = _close_orphans(study, started, disk_full[0])
        raise UserError(f"the disk is full ({disk_full[0]}); free space, then run the study again" +
                        (f" (trial {', '.join(map(str, left))} could not be marked FAIL: a worker reclaims it "
                         f"{config.study.grace_period} s after its last heartbeat)" if left else ""))
    if len(failures) >= MAX_CONSECUTIVE_FAILURES:
        raise UserError(f"{len(failures)} trials in a row failed on this worker (last: {failures[-1]}); "
                        f"stopping it so it does not burn through the study")
    if len(invalid) >= MAX_CONSECUTIVE_INVALID:
        raise UserError(f"{len(invalid)} trials in a row had choices that cannot run (last: {invalid[-1]}); "
                        f"narrow the search space or fix the config")
    return study


def _recording(objective, started: list[optuna.Trial]):
    def run(trial):
        started.append(trial)
        return objective(trial)

    return run


def _close_orphans(study: optuna.Study, started: list[optuna.Trial], reason: str) -> list[int]:
    # A full disk can fail Optuna's own write of a trial's end and leave it RUNNING: mark it FAIL with the reason
    # and queue it again where the storage still takes a write (it is on another disk, or space came back).
    # Returns the numbers of those still RUNNING: their heartbeat goes stale and a later worker retries them.
    running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    left = []
    for trial in started:
        if trial.number not in running:
            continue
        try:
            trial.set_user_attr("failure", f"disk full: {reason}"[:300])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            requeue(study, trial)
        except Exception:  # noqa: BLE001 - still full
            left.append(trial.number)
    return left


def _preflight(config: Config) -> None:
    # A worker that cannot run any trial (no CUDA, data not mounted) says so once, before it takes a trial.
    from objectives.device import resolve_device
    from objectives.pipeline import get_task

    get_task(config.task, config.pipeline.seed, resolve_device(config.pipeline.device))


def _lock_queue_pops(study: optuna.Study, url: str) -> None:
    # Optuna pops an enqueued trial (a baseline, a retry) with a read, then a conditional write; SQLite ignores
    # SELECT ... FOR UPDATE, so two threads or two processes could pop the same trial, run it twice and crash on
    # the second tell ("Cannot tell a COMPLETE trial", optuna#4002). A thread lock serialises this worker's
    # threads; for SQLite a lock file beside the database serialises the processes too (PostgreSQL's row lock
    # already does).
    from filelock import FileLock

    from .storage import lock_path, sqlite_path

    thread_lock = threading.Lock()
    # No timeout: a pop waits as long as another process's pop takes, as it did on the database itself.
    file_lock = FileLock(lock_path(url, "queue")) if sqlite_path(url) is not None else None

    def locked(pop):
        def locked_pop():
            with thread_lock:
                if file_lock is None:
                    return pop()
                with file_lock:
                    return pop()

        return locked_pop

    compat.wrap_queue_pop(study, locked)


def _guard(loop, stop: threading.Event):
    def run():
        try:
            loop()
        except KeyboardInterrupt:
            # A trial stopped by Ctrl-C/SIGTERM (its record and requeue are done): the main thread reports the
            # interruption once; letting it out would print a thread traceback per job.
            pass
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
            _exit_now(signum, frame)
        self.interrupted.set()
        if self.raise_now:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            # Once interrupted, the process is on its way out (closing runs, unloading torch takes seconds):
            # a second signal in that window must still exit 130 at once, not die with the default action.
            signal.signal(sig, _exit_now if self.count else handler)
        return False


def _exit_now(signum, frame):
    os._exit(130)


__all__ = ["run_worker"]
