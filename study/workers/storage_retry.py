"""An Optuna RDB storage that waits out a database server's outage (a restart, a failover, a network blip).

Every storage call of a worker (ask, tell, report, should_prune, user attributes, the queue) is retried with
backoff while the database refuses connections or drops them, for up to `window` seconds per outage; then the call
raises StorageUnavailable and the worker stops with one line (see worker.py). Heartbeats are never retried: a beat
missed during an outage is simply skipped, the next one comes `heartbeat_interval` later.

Only server databases (PostgreSQL, MySQL) use it: a SQLite file's OperationalErrors ("database or disk is full",
"readonly database") do not come right by waiting.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import optuna
from optuna.storages import RDBStorage

from models.errors import first_line

DEFAULT_WINDOW_S = 60
_FIRST_WAIT_S, _MAX_WAIT_S = 0.5, 5.0  # backoff between attempts: 0.5, 1, 2, 4, 5, 5, ... seconds

# The storage calls a worker makes, read and write alike (BaseStorage's and BaseHeartbeat's abstract methods).
_RETRIED = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
            "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
            "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
            "get_trial_id_from_study_id_trial_number", "get_trial_param", "set_trial_state_values",
            "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
            "get_all_trials", "get_best_trial", "get_trial_user_attrs", "get_trial_system_attrs",
            "_get_stale_trial_ids")


class StorageUnavailable(Exception):
    """The database stayed unreachable for the whole retry window (or was already given up on)."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the database connection failed or was dropped: a
    server restarting, refusing, or gone, rather than a query the database rejected."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OperationalError, InterfaceError)):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if type(exc).__module__.startswith(("psycopg", "psycopg2")) and \
                type(exc).__name__ in ("OperationalError", "InterfaceError", "AdminShutdown", "CannotConnectNow"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _driver_message(exc: BaseException) -> str:
    # The driver's own words ("connection refused", "terminating connection due to administrator command"), not
    # SQLAlchemy's wrapper ("(psycopg.OperationalError) ...") nor Optuna's ("An exception is raised during ...").
    first, seen = exc, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.startswith("psycopg") and str(exc).strip():
            return first_line(exc, 200)
        exc = exc.__cause__ or exc.__context__
    return first_line(first, 200)


class ResilientRDBStorage(RDBStorage):
    """RDBStorage whose calls wait out an outage of up to `retry_window` seconds (see the module docstring)."""

    def __init__(self, url: str, *args, retry_window: float = DEFAULT_WINDOW_S, shown_url: str = "", **kwargs):
        super().__init__(url, *args, **kwargs)
        self._window = retry_window
        self._shown_url = shown_url or "the storage"
        self._outage_lock = threading.Lock()
        self._down_since: float | None = None  # when the current outage was first noticed
        self._gave_up = False  # past the window: until a call succeeds, every call is tried once, never waited for

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_outage_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._outage_lock = threading.Lock()

    def record_heartbeat(self, trial_id: int) -> None:
        """One beat, or none during an outage (a stale trial is what the grace period is for)."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - anything else is a real fault: raise it
            if not is_transient(exc):
                raise

    def _retrying(self, name: str, call, *args, **kwargs):
        wait, retried = _FIRST_WAIT_S, False
        while True:
            try:
                result = call(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only connection failures are retried
                if not is_transient(exc):
                    if retried and name == "set_trial_state_values" and \
                            isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                        return True  # our own earlier attempt was committed before the connection dropped
                    raise
                waited = self._note_failure(exc)
                if waited is None:
                    raise StorageUnavailable(f"the storage {self._shown_url} is unreachable "
                                             f"({_driver_message(exc)})") from None
                time.sleep(wait)
                wait, retried = min(wait * 2, _MAX_WAIT_S), True
                continue
            self._note_success()
            return result

    def _note_failure(self, exc: BaseException) -> float | None:
        """Seconds into the outage, or None when it is time to give up."""
        now = time.monotonic()
        with self._outage_lock:
            if self._gave_up:
                return None
            if self._down_since is None:
                self._down_since = now
                print(f"warning: the storage {self._shown_url} is unreachable ({_driver_message(exc)}); retrying "
                      f"for up to {self._window:g} s", file=sys.stderr, flush=True)
            if now - self._down_since > self._window:
                self._gave_up = True
                return None
            return now - self._down_since

    def _note_success(self) -> None:
        if self._down_since is None and not self._gave_up:
            return
        with self._outage_lock:
            self._gave_up = False  # back: a later outage gets its own window
            if self._down_since is not None:
                print(f"the storage {self._shown_url} is back after {time.monotonic() - self._down_since:.0f} s; "
                      f"going on", file=sys.stderr, flush=True)
                self._down_since = None


def _wrap(name: str):
    original = getattr(RDBStorage, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return self._retrying(name, functools.partial(original, self), *args, **kwargs)

    return method


for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _wrap(_name))
