"""`study run`: a worker. It runs trials until the study has its TOTAL of finished trials (COMPLETE or PRUNED),
so a resumed study or many parallel workers stop at exactly that number.

Stopping: the first Ctrl-C/SIGTERM interrupts the running trial, which is marked FAIL (and queued again with
the same parameters), its MLflow run closed as KILLED; the worker exits 130. A second signal exits at once.

Faults: a database server unreachable past `study.storage_retry` seconds (storage_retry.py) stops the worker with
one line; a trial another worker reclaimed while this one was paused is let go with one line, and the worker goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import optuna

from models.errors import UserError, first_line
from study.config.config import Config
from study.confirm.confirmation import is_companion
from study.tracking import make_tracker
from study.trials.objective import TrialReclaimed, make_objective, reclaim_aware, requeue
from study.trials.record import TrialRecord
from study.workers import compat, faults
from study.workers.storage import mask_url
from study.workers.storage_retry import StorageUnavailable
from study.workers.studies import load_study

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
    preflight(config)
    config = config.with_changes("study", storage=mask_url(url))  # what the tracker records as the storage
    _lock_queue_pops(study, url)
    tracker = make_tracker(config)
    tracker.start_study(study, config, total)
    run = _Run(study, config, total, tracker, on_trial, timeout)
    try:
        with _graceful_signals(run.interrupted, raise_now=n_jobs <= 1):
            if n_jobs <= 1:
                run.loop()
            else:
                threads = [threading.Thread(target=_guard(run.loop, run.stop), daemon=True) for _ in range(n_jobs)]
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)  # short joins keep the main thread responsive to signals
                if run.interrupted.is_set():
                    raise KeyboardInterrupt
    finally:
        run.end_tracking()
    run.raise_why_stopped()
    return study


class _Run:
    """One worker's run of a study: its trial loop (on one or more threads) and why it stopped."""

    def __init__(self, study: optuna.Study, config: Config, total: int, tracker, on_trial, timeout: float | None):
        self.study, self.config, self.total, self.tracker, self.on_trial = study, config, total, tracker, on_trial
        self.deadline = time.monotonic() + timeout if timeout else None
        self.stop, self.interrupted = threading.Event(), threading.Event()
        self.objective = reclaim_aware(make_objective(config, study, total, tracker, self.interrupted), tracker)
        self.queue_only = is_companion(study)  # a confirmation study ends when its queue is empty
        self.failures: list[str] = []  # reasons of the consecutive FAIL trials of this worker
        self.disk_full: list[str] = []  # why this worker stopped on a full disk (a trial's reason or a storage error)
        self.storage_lost: list[str] = []  # why this worker stopped: its database stayed unreachable
        self.started: list[optuna.Trial] = []  # this worker's trials: one left RUNNING is closed on a full disk
        self.invalid: list[str] = []  # reasons of the consecutive trials whose choices could not run
        self.current = threading.local()  # the trial this thread runs now

    def callback(self, study_, trial) -> None:
        """Optuna's callback after each trial: count this worker's failures, stop at the total."""
        r = TrialRecord(trial)
        if r.skipped:
            return
        if self.on_trial:
            self.on_trial(study_, trial)
        if trial.state == optuna.trial.TrialState.FAIL and faults.is_disk_full(Exception(r.failure or "")):
            self.disk_full.append(r.failure)  # every next trial would fail the same way
            self.stop.set()
        if r.invalid_choice:  # says nothing about this worker
            self.invalid.append(r.failure)
        elif trial.state == optuna.trial.TrialState.FAIL and not self.interrupted.is_set():
            self.failures.append(r.failure or "unknown reason")
            self.invalid.clear()
        else:
            self.failures.clear()
            self.invalid.clear()
        if _count(study_, FINISHED) >= self.total or len(self.failures) >= MAX_CONSECUTIVE_FAILURES \
                or len(self.invalid) >= MAX_CONSECUTIVE_INVALID:
            self.stop.set()

    def loop(self) -> None:
        """Start trials until the study has its total (or this worker must stop)."""
        while not self.stop.is_set() and (self.deadline is None or time.monotonic() < self.deadline):
            try:
                if not self._next_trial():
                    break
            except StorageUnavailable as exc:  # the storage already waited its whole window
                self.storage_lost.append(str(exc))
                self.stop.set()

    def _next_trial(self) -> bool:
        """Run one trial, or wait for others' last trials; False when there is nothing left to do."""
        study = self.study
        finished = _count(study, FINISHED)
        if finished >= self.total:
            return False
        running = _count(study, (optuna.trial.TrialState.RUNNING,))
        if self.queue_only or finished + running >= self.total:
            # Others are running the last trials; stay until they end, in case one dies and is re-queued.
            if compat.heartbeat_enabled(study):
                optuna.storages.fail_stale_trials(study)
            if not _count(study, (optuna.trial.TrialState.WAITING,)):
                if self.queue_only and not running:
                    return False
                time.sleep(_POLL_SECONDS)
                return True
        try:
            study.optimize(self._recording, n_trials=1, catch=(Exception,), callbacks=[self.callback])
        except TrialReclaimed as exc:
            _say_reclaimed(str(exc))
        except Exception as exc:  # noqa: BLE001 - Optuna could not write to its storage, or could not tell a trial
            lost = _cause(exc, StorageUnavailable)
            if lost is not None:
                # Also behind Optuna's own UnboundLocalError: its `_run_trial` cannot re-read a trial it could not
                # tell (Optuna 5.1).
                raise lost from None
            if self._told_too_late(exc):
                return True
            if not faults.is_disk_full(exc):
                raise
            cause = faults.disk_full_cause(exc)
            self.disk_full.append(f"{type(cause).__name__}: {first_line(cause)}")
            self.stop.set()
        return True

    def _recording(self, trial: optuna.Trial):
        self.started.append(trial)
        self.current.trial = trial
        return self.objective(trial)

    def _told_too_late(self, exc: Exception) -> bool:
        # A trial reclaimed after its objective returned, before Optuna told it: Optuna's "Cannot tell a FAIL
        # trial". Its retry runs elsewhere; this worker goes on.
        trial = getattr(self.current, "trial", None)
        if not isinstance(exc, ValueError) or trial is None or \
                compat.trial_state(trial) != optuna.trial.TrialState.FAIL:
            return False
        _say_reclaimed(f"trial {trial.number} was reclaimed by another worker as it ended (its heartbeat was "
                       f"silent past the grace period); another worker retries it")
        return True

    def end_tracking(self) -> None:
        """Close this worker's tracking: its parent run's status, or its open runs when it stops on a lost
        database or a signal."""
        if self.storage_lost:
            self.tracker.end_study(self.study, storage_lost=self.storage_lost[0])
        elif self.interrupted.is_set():
            # Bounded wait; a second signal already exits at once (see _graceful_signals.__exit__).
            self.tracker.end_study(self.study, interrupted=True)
        else:
            # A Ctrl-C while the last tracking writes finish must not drop them, nor pass for an interrupted
            # trial: the first is absorbed, a second exits at once.
            with _graceful_signals(threading.Event(), raise_now=False):
                self.tracker.end_study(self.study)

    def raise_why_stopped(self) -> None:
        """A UserError when this worker stopped before the study's end for its own sake."""
        grace = self.config.study.grace_period
        if self.storage_lost:
            left = _close_orphans(self.study, self.started, f"storage unreachable: {self.storage_lost[0]}")
            raise UserError(f"{self.storage_lost[0]} for over {self.config.study.storage_retry} s "
                            f"(study.storage_retry); this worker stops" +
                            (f"; its trial {', '.join(map(str, left))} is retried by another worker {grace} s "
                             f"after its last heartbeat" if left else ""))
        if self.disk_full:
            left = _close_orphans(self.study, self.started, f"disk full: {self.disk_full[0]}")
            raise UserError(f"the disk is full ({self.disk_full[0]}); free space, then run the study again" +
                            (f" (trial {', '.join(map(str, left))} could not be marked FAIL: a worker reclaims it "
                             f"{grace} s after its last heartbeat)" if left else ""))
        if len(self.failures) >= MAX_CONSECUTIVE_FAILURES:
            raise UserError(f"{len(self.failures)} trials in a row failed on this worker (last: "
                            f"{self.failures[-1]}); stopping it so it does not burn through the study")
        if len(self.invalid) >= MAX_CONSECUTIVE_INVALID:
            raise UserError(f"{len(self.invalid)} trials in a row had choices that cannot run (last: "
                            f"{self.invalid[-1]}); narrow the search space or fix the config")


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """`exc`, or the exception of type `kind` it was raised from or while handling, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _say_reclaimed(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _close_orphans(study: optuna.Study, started: list[optuna.Trial], failure: str) -> list[int]:
    # A full disk or a lost database can fail Optuna's own write of a trial's end and leave it RUNNING: mark it
    # FAIL with the reason and queue it again where the storage still takes a write (it is on another disk, space
    # came back, the database is back). Returns the numbers of those still RUNNING: their heartbeat goes stale and
    # a later worker retries them.
    try:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    except Exception:  # noqa: BLE001 - the storage is gone: this worker's last trial may still be RUNNING
        running = {t.number for t in started[-1:]}
    left = []
    for trial in started:
        if trial.number not in running:
            continue
        try:
            trial.set_user_attr("failure", failure[:300])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            requeue(study, trial)
        except Exception:  # noqa: BLE001 - still full, or still unreachable
            left.append(trial.number)
    return left


def preflight(config: Config) -> None:
    """A UserError when no trial of `config` can run here (no CUDA, data not mounted): a worker says so once,
    before it takes a trial. The task it loads stays cached for the trials."""
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

    from study.workers.storage import lock_path, sqlite_path

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
