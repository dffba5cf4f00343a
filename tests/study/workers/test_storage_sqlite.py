"""SQLite storages: write-ahead logging on files, and the cases where it must stay out of the way."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import optuna
import pytest

from study.workers.storage import lock_path, open_storage, sqlite_path


def test_a_file_is_switched_to_wal_and_reopens_cheaply(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="a", storage=open_storage(url))
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("DROP TABLE trial_heartbeats")  # a table Optuna's schema set-up would create again
    assert optuna.get_all_study_names(open_storage(url)) == ["a"]
    with sqlite3.connect(tmp_path / "s.db") as db:  # the second open skipped table creation (and the check)
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'trial_heartbeats'").fetchall()


def test_a_deleted_and_recreated_file_gets_its_tables_again(tmp_path):
    path = tmp_path / "s.db"
    optuna.create_study(study_name="a", storage=open_storage(f"sqlite:///{path}"))
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"s.db{suffix}").unlink(missing_ok=True)
    optuna.create_study(study_name="b", storage=open_storage(f"sqlite:///{path}"))
    assert optuna.get_all_study_names(open_storage(f"sqlite:///{path}")) == ["b"]


def test_read_only_and_in_memory_databases_still_work(tmp_path):
    path = tmp_path / "ro.db"
    optuna.create_study(study_name="a", storage=f"sqlite:///{path}")  # plain Optuna: rollback journal
    read_only = open_storage(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert optuna.get_all_study_names(read_only) == ["a"]
    memory = open_storage("sqlite:///:memory:")
    assert optuna.create_study(study_name="m", storage=memory).study_name == "m"


@pytest.mark.parametrize("url,path", [
    ("sqlite:///s.db", "s.db"),
    ("sqlite:////tmp/x/s.db", "/tmp/x/s.db"),
    ("sqlite+pysqlite:///~/s.db", "~/s.db"),
    ("sqlite:///a%20b.db", "a b.db"),
    ("sqlite:///s.db?timeout=5", "s.db"),
    ("sqlite:///file:/tmp/x/ro.db?mode=ro&uri=true", "/tmp/x/ro.db"),
    ("sqlite:///file:rel.db?uri=true", "rel.db"),
    ("sqlite:///file:///tmp/x/s.db?uri=true", "/tmp/x/s.db"),
    ("sqlite:///file://localhost/tmp/x/s.db?uri=true&mode=rw", "/tmp/x/s.db"),
    ("sqlite:///file:/tmp/x/a%2520b.db?uri=true", "/tmp/x/a b.db"),
    ("sqlite:///file:s.db", "file:s.db"),  # without uri=true SQLite takes the name literally
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("sqlite:///file::memory:?cache=shared&uri=true", None),
    ("sqlite:///file:shared?mode=memory&cache=shared&uri=true", None),
    ("postgresql://u:p@host/db", None),
    ("journal:studies.log", None),
])
def test_sqlite_path_reads_every_url_form(url, path):
    assert sqlite_path(url) == (None if path is None else Path(path))


def test_lock_files_go_beside_a_writable_file_and_never_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "store"
    assert lock_path(f"sqlite:///{elsewhere / 's.db'}", "queue") == Path(f"{elsewhere / 's.db'}.queue.lock")
    assert lock_path("sqlite:///s.db", "init") == Path("s.db.init.lock")  # the store is in the working directory
    for url in (f"sqlite:///file:{elsewhere / 's.db'}?mode=ro&uri=true", "sqlite:///:memory:",
                "http://127.0.0.1:5000"):
        lock = lock_path(url, "init")
        assert lock.parent == Path(tempfile.gettempdir()) and lock.name.startswith("distillstudy-init-"), (url, lock)
    assert lock_path("sqlite:///:memory:", "init") != lock_path("http://127.0.0.1:5000", "init")
    opened = open_storage(f"sqlite:///file:{_read_only_copy(tmp_path)}?mode=ro&uri=true")
    assert optuna.get_all_study_names(opened) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["ro"]  # no lock file in the working directory
    assert [p.name for p in (tmp_path / "ro").iterdir()] == ["ro.db"]  # nor beside a file nobody writes


def _read_only_copy(tmp_path) -> Path:
    path = tmp_path / "ro" / "ro.db"
    path.parent.mkdir()
    optuna.create_study(study_name="a", storage=f"sqlite:///{path}")
    return path
