"""Faults of the machine rather than of a trial: a full disk stops a worker with one line."""

from __future__ import annotations

import errno


def disk_full_cause(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain (itself, what it was raised from or while handling) that says the disk is
    full: ENOSPC from a file write (checkpoints, the teacher cache), SQLite's "database or disk is full". Optuna
    re-raises a failed write of a trial's end as its own AssertionError, so the whole chain is read. None if none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`'s chain says the disk is full (see `disk_full_cause`)."""
    return disk_full_cause(exc) is not None
