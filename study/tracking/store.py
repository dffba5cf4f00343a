"""Opening MLflow for a study: bounded HTTP timeouts, a quiet store initialisation, the experiment and the study's
parent run found or created under a lock, and the parent run's status through the study's life.

The parent run `study <name>` is SCHEDULED once `study create` made it, RUNNING while a worker runs, FINISHED when
a worker stops with the study at its total, and KILLED when a worker stops short of it with no trial left running
(`study run` resumes it, and it is RUNNING again).
"""

from __future__ import annotations

import logging
import os
import random
import time

from filelock import FileLock

from study.workers.storage import lock_path

# MLflow's defaults retry a failed request 7 times with exponential backoff and wait 120 s for each answer: about
# 4 minutes for a dead server and over 15 for a hung one, per call. A study goes on without tracking instead (see
# MlflowTracker), so a call gives up after a few seconds. Set these variables to override.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 # MLflow prints "View run ... at http://..." for every closed run; a worker's stdout is its trials.
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# The experiment tag MLflow 3's UI reads to pick a view: without it an experiment opens in the GenAI view (traces,
# evaluations); this value is the model-training view (runs, metrics, models).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE = "mlflow.note.content"  # the experiment's (and a run's) description in the UI
# Several workers starting at once on a fresh store: each waits for the lock this long, then tries this often.
LOCK_TIMEOUT_S = 300
OPEN_ATTEMPTS = 4


def configure_client() -> None:
    """Bounded HTTP timeouts and retries (unless set already), and no store-initialisation log lines: alembic's
    'Context impl SQLiteImpl' and MLflow's 'Creating initial MLflow database tables' would break the progress bar
    (as would a server registry's 'Waiting up to 300 seconds for model version to finish creation')."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store",
                 "mlflow.store.model_registry.sqlalchemy_store", "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_outage(exc: BaseException) -> bool:
    """Whether a tracking call failed because the store is unavailable (unreachable or hung server, a database or
    artifact folder that cannot be written, a full disk) rather than because of what was logged."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, OperationalError)):  # requests' errors are OSErrors too
            return True
        # The REST client's "API request to <url> failed with exception ..." after its retries, and a server's
        # 5xx ("... failed with error code 500 != 200"): the message is all it keeps of the cause.
        if isinstance(exc, MlflowException) and str(exc.message).startswith("API request to"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_database_outage(uri: str, window: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, tried again with backoff while a database server behind the tracking store (a
    `postgresql://` or `mysql://` URI) drops or refuses connections, for up to `window` seconds (a restart); then,
    or for any other store or error, its exception is raised. MLflow's engine tests pooled connections before use,
    so the first call after the restart gets a fresh one."""
    from study.workers.storage_retry import is_transient

    deadline, wait = time.monotonic() + window, 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only a server database's connection failures are retried
            server_db = uri.startswith(("postgresql", "mysql"))
            if not (server_db and is_transient(exc)) or time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


def is_unreachable(exc: BaseException) -> bool:
    """Whether the tracking server did not answer at all (refused, timed out): then nothing else can be sent."""
    import requests

    text = str(exc)
    return isinstance(exc, (requests.ConnectionError, requests.Timeout)) or \
        "failed with exception" in text or "failed with timeout exception" in text


def registry_lock(uri: str) -> str:
    """The lock file under which a machine's workers decide and make `<study>-best` versions (`registry.py`)."""
    return str(lock_path(uri, "registry"))


def locked_with_retry(uri: str, fn):
    """`fn()` under the store's file lock, tried again (with a short random wait) when it fails on the store: two
    processes initialising one database, or a server that is still starting, succeed on a later attempt.

    A SQLite store is locked beside its file (workers on one machine share it); any other store by a lock file named
    after its URI in the temp folder (a server initialises its own database; this only orders the experiment and
    parent-run lookups of one machine's workers)."""
    lock = FileLock(lock_path(uri, "init"), timeout=LOCK_TIMEOUT_S)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with lock:
                return fn()
        except Exception as exc:  # noqa: BLE001 - retried only when the database or server may come right
            # A folder that cannot be written (an OSError raised as such) will not come right by waiting.
            transient = not isinstance(exc, OSError) and (is_outage(exc) or "alembic" in str(exc).lower())
            if attempt == OPEN_ATTEMPTS - 1 or not transient:
                raise
            time.sleep(0.5 * (attempt + 1) + random.random())
    raise AssertionError("unreachable")


def experiment_id(client, name: str, study_name: str) -> str:
    """The experiment `name` (created with the model-training view tag and a description when missing; an older
    experiment gets the tags it lacks)."""
    tags = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1],
            NOTE: f"distillstudy study `{study_name}`: the parent run `study {study_name}` holds the config and "
                  f"`best_target_val_acc`, and after `study confirm` the verdict (tags `distillstudy.verdict`, "
                  f"`distillstudy.answer`); one child run per trial (params `layers.<group>`, `alpha`, ...), one per "
                  f"teacher; `{study_name}-best` is the best search trial (unconfirmed) until the confirmation "
                  f"registers its answer (confirmed)."}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=tags)
    for key, value in tags.items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def find_parent_run(client, experiment: str, study_name: str) -> str | None:
    """The study's parent run id, or None."""
    runs = client.search_runs([experiment], f"tags.`distillstudy.role` = 'study' and "
                                            f"tags.`optuna.study` = '{study_name}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def study_status(finished: int, total: int, running: int) -> str | None:
    """The parent run's status when a worker stops: FINISHED at the total, KILLED short of it with no trial left
    running, None (leave it RUNNING) while other workers are still at it."""
    if finished >= total:
        return "FINISHED"
    return None if running else "KILLED"
