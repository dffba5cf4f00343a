"""Worker processes against database faults: a PostgreSQL restart in the middle of a study (the test's own
PostgreSQL instance, never the shared server), a database that stays down past `study.storage_retry`, and a worker
paused (SIGSTOP) past the heartbeat grace period whose trial another worker reclaims.
"""

from __future__ import annotations

import signal
import threading
import time

import optuna
import pytest
from pg_server import fresh_postgres_database, own_postgres
from test_cluster import (  # noqa: F401
    FINISHED,
    LONG,
    SLOW,
    TINY,
    S,
    create,
    running_trial,
    shared_cache,
    study_name,
    trials,
    wait_for,
    workers,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _tracking(uri: str) -> list[str]:
    """Tracking on, into `uri`, with nothing but runs and metrics logged."""
    return ["tracking.enabled=true", f"tracking.mlflow_uri={uri}", "tracking.log_weights=none",
            "tracking.register_best=false"]


def _mlflow_statuses(uri: str, name: str) -> dict[str, str]:
    """run name -> status of every run of the study's experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    return {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}


def _no_traceback(*ws) -> None:
    for w in ws:
        assert "Traceback" not in w.stderr + w.stdout, w.describe()


@pytest.fixture(scope="module")
def module_postgres():
    with own_postgres() as server:
        yield server


@pytest.fixture
def postgres(module_postgres):
    """The module's own PostgreSQL (one initdb for all its tests), running at the start of each test: a test that
    failed while it was down leaves it stopped."""
    if module_postgres.proc.poll() is not None:
        module_postgres.start()
    return module_postgres


@pytest.mark.slow
def test_workers_wait_out_a_postgresql_restart(request, postgres, study_name, workers, tmp_path, shared_cache,
                                               mlflow_sqlite):
    uri, tracking = mlflow_sqlite, _tracking(mlflow_sqlite)
    sets = [*SLOW, "pipeline.distill_epochs=3", f"pipeline.cache_dir={shared_cache}", *tracking]
    create(request, study_name, postgres.url, sets, tmp_path)
    procs = [workers.start(study_name, postgres.url, 6, tmp_path, f"w{i}") for i in range(2)]
    # Restart once both workers are in a trial (and one trial is done): their next storage call meets the outage.
    wait_for(lambda: [t for t in trials(study_name, postgres.url, FINISHED)], LONG, "a finished trial", procs)
    wait_for(lambda: len(trials(study_name, postgres.url, (S.RUNNING,))) == 2, LONG, "two running trials", procs)
    postgres.stop()
    # Both report every epoch (a fraction of a second): 2 s down meets their calls. Longer outages only lengthen the
    # backoff they wait out (0.5, 1, 2, 4 s between tries).
    time.sleep(2)
    postgres.start()

    for w in procs:
        assert w.wait(timeout=LONG) == 0, w.describe()
    _no_traceback(*procs)
    assert any("is unreachable" in w.stderr for w in procs), "the restart hit neither worker"
    all_trials = trials(study_name, postgres.url)
    assert len([t for t in all_trials if t.state in FINISHED]) == 6, [(t.number, t.state.name) for t in all_trials]
    assert not [t.number for t in all_trials if t.state in (S.RUNNING, S.WAITING)]
    statuses = _mlflow_statuses(uri, study_name)
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses[f"study {study_name}"] == "FINISHED"


@pytest.mark.slow
def test_a_database_down_past_the_retry_window_stops_the_worker_in_one_line(request, postgres, study_name, workers,
                                                                             tmp_path, shared_cache, mlflow_sqlite):
    uri, tracking = mlflow_sqlite, _tracking(mlflow_sqlite)
    sets = [*SLOW, f"pipeline.cache_dir={shared_cache}", *tracking, "study.storage_retry=2",
            "study.heartbeat_interval=1", "study.grace_period=3", "study.baselines=false"]
    create(request, study_name, postgres.url, sets, tmp_path)
    w = workers.start(study_name, postgres.url, 3, tmp_path, "a")
    victim = wait_for(lambda: running_trial(study_name, postgres.url, min_step=1), LONG, "a trial in training", [w])
    postgres.stop()
    rc = w.wait(timeout=LONG)
    postgres.start()

    assert rc == 2, w.describe()
    _no_traceback(w)
    errors = [line for line in w.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "study.storage_retry" in errors[0], w.stderr
    statuses = _mlflow_statuses(uri, study_name)  # the tracking store (SQLite) is still there: all closed
    assert statuses[f"trial {victim.number}"] == "FAILED" and statuses[f"study {study_name}"] == "KILLED", statuses

    # Its trial stayed RUNNING (nothing could write it): the next worker fails it once its heartbeat is stale and
    # runs its retry.
    b = workers.run_here(study_name, postgres.url, 3, tmp_path, "b")
    assert b.returncode == 0, b.describe()
    _no_traceback(b)
    after = {t.number: t for t in trials(study_name, postgres.url)}
    assert after[victim.number].state == S.FAIL
    assert [t for t in after.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert "RUNNING" not in _mlflow_statuses(uri, study_name).values()


@pytest.mark.slow
def test_a_paused_worker_whose_trial_was_reclaimed_goes_on(request, postgres_url, study_name, workers, tmp_path,
                                                           shared_cache):
    # MLflow on PostgreSQL: a worker stopped inside a write to a SQLite store would hold its file lock, and the
    # other worker could not even open the store.
    with fresh_postgres_database(postgres_url) as uri:
        _paused_worker_goes_on(request, postgres_url, study_name, workers, tmp_path, shared_cache, uri)


def _paused_worker_goes_on(request, postgres_url, study_name, workers, tmp_path, shared_cache, uri):
    tracking = _tracking(uri)
    sets = [*SLOW, "pipeline.distill_epochs=5", f"pipeline.cache_dir={shared_cache}", *tracking,
            "study.heartbeat_interval=1", "study.grace_period=3", "study.baselines=false"]
    create(request, study_name, postgres_url, sets, tmp_path)
    a = workers.start(study_name, postgres_url, 3, tmp_path, "a")
    victim = wait_for(lambda: running_trial(study_name, postgres_url, min_step=1), LONG, "a trial in training", [a])
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b = workers.start(study_name, postgres_url, 3, tmp_path, "b")
        # B fails A's silent trial when it starts its own, and queues a retry.
        wait_for(lambda: [t for t in trials(study_name, postgres_url, (S.FAIL,)) if t.number == victim.number],
                 LONG, f"trial {victim.number} reclaimed", [b])
    finally:
        a.proc.send_signal(signal.SIGCONT)

    for w in (a, b):
        assert w.wait(timeout=LONG) == 0, w.describe()
    _no_traceback(a, b)
    assert f"trial {victim.number} was reclaimed: its heartbeat" in a.stderr, a.stderr  # found by its next report
    all_trials = trials(study_name, postgres_url)
    assert len([t for t in all_trials if t.state in FINISHED]) == 3
    assert not [t.number for t in all_trials if t.state in (S.RUNNING, S.WAITING)]
    retries = [t for t in all_trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    statuses = _mlflow_statuses(uri, study_name)
    assert statuses[f"trial {victim.number}"] == "FAILED", statuses
    assert "RUNNING" not in statuses.values(), statuses


# ---- in-process: the retrying storage and the tracking store's retry, on the test's own PostgreSQL -------------------
def _during_outage(postgres, call, seconds: float = 1.0):
    """`call()` on a thread while the server is down for `seconds`; its result. (The server is started on this,
    the main thread: it dies with the thread that started it, see tests/server_process.py.)"""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()))
    postgres.stop()
    thread.start()
    time.sleep(seconds)
    postgres.start()
    thread.join(timeout=60)
    assert result, "the call failed (see the thread's exception above)"
    return result[0]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_storage_calls_wait_out_a_restart_and_give_up_past_the_window(postgres, capfd):
    from study.workers.storage import open_storage
    from study.workers.storage_retry import StorageUnavailable

    storage = open_storage(postgres.url, heartbeat_interval=1, grace_period=5, retry_window=30)
    study = optuna.create_study(study_name="outage", storage=storage)
    trial = study.ask()
    _during_outage(postgres, lambda: trial.report(0.5, 1))  # waits for the server to come back
    study.tell(trial, 0.5)
    assert [t.state for t in study.get_trials()] == [S.COMPLETE]
    err = capfd.readouterr().err
    assert "is unreachable" in err and "is back after" in err, err

    short = open_storage(postgres.url, retry_window=1)
    postgres.stop()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="is unreachable"):
        optuna.load_study(study_name="outage", storage=short).get_trials()
    assert time.monotonic() - started < 10
    storage_started = time.monotonic()
    short.record_heartbeat(trial._trial_id)  # skipped at once, not waited for
    assert time.monotonic() - storage_started < 5


def test_tracking_database_calls_wait_out_a_restart(postgres):
    import sqlalchemy

    from study.tracking.store import retry_database_outage

    engine = sqlalchemy.create_engine(postgres.url.replace("postgresql://", "postgresql+psycopg://"),
                                      pool_pre_ping=True)

    def query():
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("select 1")).scalar()

    assert query() == 1
    assert _during_outage(postgres, lambda: retry_database_outage(postgres.url, 30, query)) == 1
    postgres.stop()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        retry_database_outage(postgres.url, 1, query)
    engine.dispose()
