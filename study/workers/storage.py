"""Optuna storages from a URL: any SQLAlchemy URL (sqlite, postgresql, mysql) as RDBStorage with heartbeats, or
`journal:PATH` for a JournalStorage file on a shared filesystem. Passwords never reach output or logs."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import optuna

from models.errors import UserError, first_line, mask_secrets, mask_userinfo
from study.workers.storage_retry import DEFAULT_WINDOW_S, ResilientRDBStorage

# Heartbeats and their retry callback are marked experimental in Optuna; we rely on them on purpose and the
# warnings would otherwise print on every worker start.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///distillstudy.db"

# URLs whose tables and schema version this process has already checked. A worker opens its storage a few times
# (to read the stored config, then with heartbeats); each full open creates missing tables and runs Alembic's
# version check, about a fifth of a second each, so later opens skip both.
_checked: set = set()


def _check_key(url: str):
    # A relative SQLite path names a different file in another directory, and a deleted file comes back empty
    # (possibly under a reused inode): key SQLite by its absolute path and the file itself, never an empty one.
    if not url.startswith("sqlite"):
        return url
    path = sqlite_path(url)
    if path is None:
        return None  # in-memory: every open is a new database
    try:
        resolved = path.expanduser().resolve()
        st = resolved.stat()
    except OSError:
        return None  # not created yet: nothing checked
    return (str(resolved), st.st_dev, st.st_ino) if st.st_size > 0 else None


def resolve_storage_url(cli_value: str | None, config_value: str | None = None) -> str:
    """`--storage` (or $DISTILLSTUDY_STORAGE, which the CLI reads as its default) beats the config's
    `study.storage` beats the default."""
    return cli_value or config_value or DEFAULT_STORAGE


def mask_url(url: str) -> str:
    """A storage URL or tracking URI as it may be shown: `postgresql://user:secret@host/db` ->
    `postgresql://user:***@host/db`, also with an empty user, an unescaped '@' in the password, or a
    `?password=` query parameter. SQLAlchemy renders the URLs it parses; what it would misread (two '@') or cannot
    parse falls back to masking everything between the user and the last '@'."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url) if url.count("@") <= 1 else None
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (journal:PATH, a typo): the fallback masks it
        parsed = None
    shown = parsed.render_as_string(hide_password=True) if parsed is not None else mask_userinfo(url)
    return mask_secrets(shown)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, None for an in-memory database or any other kind of URL.

    Read as SQLAlchemy and SQLite read it: `sqlite:///PATH` (relative) and `sqlite:////PATH` (absolute), and with
    `uri=true` in the query SQLite's URI filename `sqlite:///file:PATH?mode=ro&uri=true` (the `file:` prefix, an
    optional `//localhost` authority and percent escapes are not part of the file's name). In memory:
    `sqlite://`, `sqlite:///:memory:`, `file::memory:` and `mode=memory`.
    """
    parsed = _sqlite_url(url)
    if parsed is None:
        return None
    database = parsed.database or ""
    if _is_uri(parsed) and database.startswith("file:"):
        database = _uri_filename(database)
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        return None
    return Path(database)


def lock_path(url: str, purpose: str) -> Path:
    """The lock file through which processes on one machine take turns at `purpose` (`init`, `queue`) on store
    `url`: beside a writable SQLite file (`s.db.init.lock`: every worker on that file meets there, wherever it was
    started), else (an in-memory or read-only SQLite database, a server) in the temp folder under a hash of the URL.
    Never in the working directory for a store that lives elsewhere."""
    path = sqlite_path(url)
    if path is not None and not _read_only(url):
        return Path(f"{path.expanduser()}.{purpose}.lock")
    from objectives.keys import stable_hash

    return Path(tempfile.gettempdir()) / f"distillstudy-{purpose}-{stable_hash(url)}.lock"


def _sqlite_url(url: str):
    """`url` parsed by SQLAlchemy when it is a SQLite URL, else None."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can read: open_storage says why
        return None
    return parsed if parsed.get_backend_name() == "sqlite" else None


def _is_uri(parsed) -> bool:
    # SQLAlchemy hands the database to SQLite as a URI filename when the query says uri=true (any true spelling).
    return str(parsed.query.get("uri", "")).lower() in ("true", "1", "yes", "on")


def _uri_filename(database: str) -> str:
    """The file of SQLite URI filename `file:PATH` (`file:///PATH`, `file://localhost/PATH`); '' for none."""
    from urllib.parse import unquote

    rest = database[len("file:"):]
    if rest.startswith("//"):  # an authority: SQLite accepts only an empty one or localhost
        authority, _, path = rest[2:].partition("/")
        rest = "/" + path if authority in ("", "localhost") else rest
    return unquote(rest.split("#", 1)[0])


def _read_only(url: str) -> bool:
    parsed = _sqlite_url(url)
    if parsed is None or not _is_uri(parsed):
        return False
    return parsed.query.get("mode") == "ro" or str(parsed.query.get("immutable", "")).lower() in ("1", "true")


def storage_exists(url: str) -> bool:
    """False when the URL names a local file (SQLite, journal) that does not exist yet."""
    path = sqlite_path(url) or (Path(url[len("journal:"):]) if url.startswith("journal:") else None)
    return path is None or path.exists()


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None, create: bool = True,
                 retry_window: float = DEFAULT_WINDOW_S) -> optuna.storages.BaseStorage:
    """Open the storage; `create=False` refuses to create a new file (for commands that only read).

    RDB storages get a heartbeat (when `heartbeat_interval` is given): a RUNNING trial whose worker stops beating
    for `grace_period` seconds is marked FAIL by the next worker and re-queued with the same parameters. A database
    server's storage waits out an outage of up to `retry_window` seconds in every call (study.storage_retry).
    """
    if not create and not storage_exists(url):
        raise UserError(f"storage '{mask_url(url)}' does not exist (create a study first: distillstudy study create)")
    if url.startswith("journal:"):
        return _open_journal(url[len("journal:"):], writing=create)
    if "://" not in url:
        raise UserError(f"storage '{mask_url(url)}' is not a URL (sqlite:///file.db, postgresql://..., journal:PATH)")
    if not url.startswith("sqlite") and url.count("@") > 1:
        # Read as the host, the part after the extra '@' would go to DNS and come back in the driver's error.
        raise UserError(f"storage '{mask_url(url)}' has more than one '@': write an '@' inside the password as %40")
    if create and sqlite_path(url) is not None:
        _check_writable(sqlite_path(url).expanduser(), "SQLite file")
    kwargs, storage_class = {}, optuna.storages.RDBStorage
    if url.startswith("sqlite"):
        # Several workers on one SQLite file: wait for the write lock instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        # A pooled connection the server dropped (a restart) is tested and replaced before use, not failed with.
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith("postgresql") and "connect_timeout" not in url:
            # libpq waits forever for a server that accepts but never answers; an attempt gives up instead.
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        storage_class = ResilientRDBStorage
        kwargs = {"retry_window": retry_window, "shown_url": f"'{mask_url(url)}'"}
    if heartbeat_interval:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=retry)
    key = _check_key(url)
    checked = key is not None and key in _checked
    try:
        with _first_open_lock(None if checked or sqlite_path(url) is None else url):
            storage = storage_class(url, engine_kwargs=engine_kwargs, skip_compatibility_check=checked,
                                    skip_table_creation=checked, **kwargs)
        key = _check_key(url)  # now that the file exists
        if key is not None:
            _checked.add(key)
    except Exception as exc:  # noqa: BLE001 - driver errors differ per database; all mean "cannot use this URL"
        raise UserError(f"cannot open storage '{mask_url(url)}': {first_line(exc)}") from None
    if sqlite_path(url) is not None:  # a file (an in-memory database would be lost by the reconnect)
        _fast_sqlite(storage.engine)
    return storage


@contextlib.contextmanager
def _first_open_lock(url: str | None):
    # Workers started together on a fresh SQLite file would all create its tables and stamp its Alembic version
    # ("UNIQUE constraint failed: alembic_version.version_num"): a lock file beside it lets one set it up first.
    # A folder where no lock file can be made (read-only) has nobody to race with.
    if url is None:
        yield
        return
    from filelock import FileLock

    lock = FileLock(lock_path(url, "init"), timeout=300)
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _check_writable(path: Path, kind: str) -> None:
    """A storage file that workers will write: the file (when it exists) and its directory must be writable
    (SQLite writes its -wal/-shm and journal files beside the database), else one line instead of a traceback
    ("attempt to write a readonly database") at the first write."""
    if path.is_dir():
        raise UserError(f"{kind} '{path}' is a directory; name a file in it")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{kind} '{path}' is read-only; make it writable, or copy it somewhere writable")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise UserError(f"{kind} '{path}': its directory '{folder}' is read-only (the storage writes files beside "
                        f"it); use a writable directory")


def _open_journal(text: str, writing: bool):
    """`journal:PATH`: an Optuna JournalStorage file. Refuses an empty path, a directory, a SQLite database (it
    would be appended to and ruined) and, for writers, a read-only file, each in one line."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not text.strip():
        raise UserError("storage 'journal:' needs a file path, e.g. journal:studies.log")
    path = Path(text).expanduser()
    if path.is_dir():
        raise UserError(f"journal file '{path}' is a directory; name a file in it, e.g. journal:{path / 'studies.log'}")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(16)
        if head == b"SQLite format 3\0":
            raise UserError(f"'{path}' is a SQLite database, not a journal file: use --storage sqlite:///{path}")
        if head.strip() and not head.lstrip().startswith(b"{"):  # every journal record is a JSON object
            raise UserError(f"'{path}' is not an Optuna journal file (its records are JSON objects, one a line)")
    try:
        if writing:
            path.parent.mkdir(parents=True, exist_ok=True)
            _check_writable(path, "journal file")
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise UserError(f"cannot open journal file '{path}': {first_line(exc)}") from None
    except ValueError as exc:  # lines that are not Optuna's journal records
        raise UserError(f"'{path}' is not an Optuna journal file ({first_line(exc)})") from None


def _fast_sqlite(engine) -> None:
    """Write-ahead logging with `synchronous=NORMAL` on every connection of `engine`.

    A trial writes to the storage after every epoch (report, should_prune) and at its end; in SQLite's default
    rollback-journal mode each of those commits syncs the file to disk (~5-10 ms each, the largest fixed cost
    of a short trial). In WAL mode with NORMAL sync a commit is an append, still safe against a crashed
    worker (only a power loss can drop the last commits), and readers no longer block the writer, so parallel
    workers on one file wait less. WAL needs all workers on one host (no network filesystems), which SQLite
    storage needs anyway (README: use PostgreSQL or journal: storage across machines).
    """
    import sqlite3

    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            pass  # a read-only file (or mount) keeps its journal mode: reading it still works
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # connections opened while Optuna set up the schema reconnect with the pragmas

