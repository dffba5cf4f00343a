"""A background writer: tracking calls run in order on one daemon thread, so training never waits for the
tracking store (a remote MLflow server, or a SQLite file that syncs to disk on every commit)."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

from models.errors import first_line


class BackgroundWriter:
    """Runs submitted calls one after another, in submission order, on its own thread.

    One thread, not a pool: the calls of one run (epoch batches, final metrics, artifacts, then the status) must
    land in order, and a single writer keeps that without any per-run bookkeeping. Trial threads only enqueue.
    A failing call prints one line to stderr and is dropped: losing a curve point must not fail a trial whose
    result is already in the Optuna storage. `flush()` waits until everything submitted so far has run; `close()`
    also ends the thread (a later `submit` starts a new one).

    The queue is bounded: when the store falls far behind (a slow tracking server), `submit` waits, so a backlog
    slows trials down instead of growing without limit.
    """

    MAX_QUEUED = 1000  # calls; an epoch is one, a trial's end one

    def __init__(self, name: str = "tracking-writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=self.MAX_QUEUED)
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.errors: list[str] = []

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Queue `fn(*args, **kwargs)`; it runs after everything submitted before it."""
        with self._start_lock:
            if self._thread is None:
                # A daemon thread: a process that must exit at once (a second Ctrl-C) is not held up by it.
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            # Under the lock, so nothing lands behind close()'s stop marker; the writer drains without the lock.
            self._queue.put((fn, args, kwargs))

    def flush(self) -> None:
        """Block until every call submitted so far has run (or failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self, timeout: float | None = None) -> bool:
        """Run everything queued, then end the thread. With a `timeout` (seconds), stop waiting after it: returns
        False when calls were still running or queued then (the daemon thread dies with the process)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return True
            self._queue.put(None)  # the stop marker, after everything already queued
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                message = f"{getattr(fn, '__name__', 'call')}: {type(exc).__name__}: {first_line(exc)}"[:300]
                self.errors.append(message)
                print(f"warning: tracking call failed ({message})", file=sys.stderr, flush=True)
            finally:
                self._queue.task_done()
