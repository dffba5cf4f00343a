"""SQLite storages: write-ahead logging on files, and the cases where it must stay out of the way."""

from __future__ import annotations

import sqlite3

import optuna

from study.storage import open_storage


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
