"""SQLite storages: write-ahead logging on files, and the cases where it must stay out of the way."""

from __future__ import annotations

import sqlite3

import optuna

from study.background import BackgroundWriter
from study.storage import open_storage


def test_a_file_is_switched_to_wal_and_reopens_cheaply(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="a", storage=open_storage(url))
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert optuna.get_all_study_names(open_storage(url)) == ["a"]  # second open: schema check skipped


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


def test_the_writer_runs_calls_in_order_and_ends_its_thread():
    writer, seen = BackgroundWriter(), []
    for i in range(50):
        writer.submit(seen.append, i)
    writer.submit(lambda: 1 / 0)  # a failure is reported, not raised, and does not stop the writer
    writer.submit(seen.append, "after")
    writer.close()
    assert seen == [*range(50), "after"]
    assert len(writer.errors) == 1 and "ZeroDivisionError" in writer.errors[0]
    assert writer._thread is None
