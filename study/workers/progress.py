"""A worker's progress: one bar for the study's finished trials (on a terminal), with a line per finished trial
printed above it. Without a terminal (logs, CI, pipes) only the lines are printed, each with an `[n/total]`
counter, so the output stays plain text."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO


class TrialProgress:
    """The bar lives on `stream` (stderr by default) and only when it is a terminal; `line()` prints through
    `echo` (stdout) and keeps the bar below the lines. Thread-safe: `--n-jobs` trials finish on several threads."""

    def __init__(self, total: int, done: int, echo: Callable[[str], None], stream: TextIO | None = None):
        self.total, self.echo = total, echo
        self._lock = threading.Lock()
        stream = stream or sys.stderr
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm  # Optuna's own progress-bar dependency

            self._bar = tqdm(total=total, initial=min(done, total), unit="trial", file=stream, dynamic_ncols=True,
                             desc="trials", leave=True)

    def finished(self, done: int, text: str, best: float | None = None) -> None:
        """One trial finished: `done` finished trials in the study so far; `text` its line."""
        with self._lock:
            counter = f"[{min(done, self.total):>3}/{self.total}] "
            if self._bar is None:
                self.echo(counter + text)
                return
            self._bar.write(counter + text, file=sys.stdout)  # clears the bar, prints, redraws it
            self._bar.n = max(self._bar.n, min(done, self.total))  # threads may report out of order
            if best is not None:
                self._bar.set_postfix_str(f"best {best:.4f}", refresh=False)
            self._bar.refresh()

    def note(self, text: str, err: bool = False) -> None:
        """A line that is not a finished trial ("training the teacher", a warning), above the bar; `err`: on
        stderr (warnings, which `--quiet` keeps)."""
        with self._lock:
            stream = sys.stderr if err else sys.stdout
            if self._bar is not None:
                self._bar.write(text, file=stream)
            elif err:
                print(text, file=stream, flush=True)
            else:
                self.echo(text)

    def close(self) -> None:
        """Leave the bar as it ended (a no-op without a terminal)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


class _ToProgress(logging.Handler):
    def __init__(self, progress: TrialProgress | None):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        text, err = self.format(record), record.levelno >= logging.WARNING
        if self.progress is not None:
            self.progress.note(text, err=err)
        elif err:  # --quiet: warnings only
            print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def pipeline_lines(progress: TrialProgress | None) -> Iterator[None]:
    """While a worker runs: the pipeline's log lines (the `objectives` loggers: a teacher being trained or loaded
    from the cache, a corrupt cache entry, a teacher near chance) printed above the bar; with no `progress`
    (`--quiet`) only the warnings."""
    logger, handler = logging.getLogger("objectives"), _ToProgress(progress)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed here, not again by a root handler or Python's last-resort handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
