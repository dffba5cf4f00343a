"""Secrets stay out of everything a study stores or prints.

A password in `tracking.mlflow_uri` moves into MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
libpq's PGPASSWORD) and the URI is stored without it; a password in the Optuna storage URL is stored masked. The
main test runs a study against a real `mlflow server --app-name basic-auth` with a password in both URLs, then
greps every table of the Optuna storage (PostgreSQL) and every file of the MLflow server's store for either
password. A wrong login is one `error:` line, exit 2, and no study left behind.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import uuid
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow_server import mlflow_server

import cli
from models.errors import UserError
from study.tracking.access import PASSWORD, PG_PASSWORD, USERNAME, split_credentials

REPO = Path(__file__).resolve().parents[3]
TINY = ["pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1",
        "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1", "task.max_per_domain=300", "study.baselines=false",
        "study.confirm.top=0", "study.pruner.name=none", "study.pruner.kwargs={}"]


@pytest.mark.parametrize("uri,clean,env", [
    ("http://admin:S3c%40ret@127.0.0.1:5000/", "http://127.0.0.1:5000/",
     {USERNAME: "admin", PASSWORD: "S3c@ret"}),  # percent-escaped
    ("https://u:p@ss@mlflow.lab:443/x?y=1", "https://mlflow.lab:443/x?y=1", {USERNAME: "u", PASSWORD: "p@ss"}),
    ("http://token@mlflow:5000", "http://mlflow:5000", {USERNAME: "token"}),
    ("http://mlflow:5000", "http://mlflow:5000", {}),
    ("postgresql://mlflow:Pg%40pw@db:5432/mlflow", "postgresql://mlflow@db:5432/mlflow", {PG_PASSWORD: "Pg@pw"}),
    ("postgresql+psycopg://u@db/m?password=pw&sslmode=require", "postgresql+psycopg://u@db/m?sslmode=require",
     {PG_PASSWORD: "pw"}),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db", {}),
    ("databricks://profile", "databricks://profile", {}),
])
def test_credentials_leave_the_uri_for_the_clients_own_variables(uri, clean, env):
    assert split_credentials(uri) == (clean, env)


def test_a_password_in_another_database_uri_is_refused():
    with pytest.raises(UserError, match=r"mysql\+pymysql://u:\*\*\*@db/m. holds a password") as info:
        split_credentials("mysql+pymysql://u:Secret@db/m")
    assert "Secret" not in str(info.value)


@pytest.fixture
def credentials_env(monkeypatch):
    """The credential variables unset now and put back afterwards (a run moves credentials into them)."""
    for key in (USERNAME, PASSWORD, PG_PASSWORD):
        monkeypatch.setenv(key, "")  # recorded, so undo restores the original state
        monkeypatch.delenv(key)


def _grep_postgres(url: str, needle: str) -> list[str]:
    """The tables of the database at `url` with a row whose text holds `needle`."""
    import psycopg

    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return [t for t in tables
                if conn.execute(f'SELECT count(*) FROM "{t}" AS row WHERE row::text LIKE %s',
                                (f"%{needle}%",)).fetchone()[0]]


def _grep_files(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow
def test_passwords_reach_neither_the_optuna_storage_nor_mlflow(postgres_url, tmp_path, monkeypatch, credentials_env,
                                                                teacher_cache_dir):
    monkeypatch.chdir(tmp_path)
    login, storage_secret = f"Login{uuid.uuid4().hex[:10]}", f"Storage{uuid.uuid4().hex[:10]}"
    # This server's PostgreSQL trusts local users, so the storage password is accepted and ignored.
    storage = postgres_url.replace("postgres@", f"postgres:{storage_secret}@")
    name = f"secret-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "server"
    root.mkdir()
    # MLflow's own basic_auth.ini plus its credential cache: without it the server runs a PBKDF2 hash on every
    # request (about 20 s of CPU over this study's few hundred calls). The cache keeps only accepted logins, so the
    # wrong password below is checked, and refused, as without it.
    auth = configparser.ConfigParser()
    auth.read(Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "basic_auth.ini")
    auth["mlflow"]["auth_cache_ttl_seconds"] = "600"
    auth_ini = root / "basic_auth.ini"
    with open(auth_ini, "w") as f:
        auth.write(f)
    server_env = {"MLFLOW_AUTH_ADMIN_PASSWORD": login, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
                  "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini)}
    with mlflow_server(root, "--app-name", "basic-auth", env=server_env) as (url, _proc):
        def study_run(mlflow_uri: str | None, *args: str):
            config = [] if mlflow_uri is None else [
                "--config", str(REPO / "examples" / "quickstart.yaml"),
                *[a for v in [*TINY, f"tracking.mlflow_uri={mlflow_uri}", f"pipeline.cache_dir={teacher_cache_dir}"]
                  for a in ("--set", v)]]
            return CliRunner().invoke(cli.main, ["study", "run", name, "--storage", storage, "--quiet", *config,
                                                 *args])

        host = url.removeprefix("http://")
        refused = study_run(f"http://admin:wrong@{host}", "--n-trials", "1")
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == f"error: the MLflow tracking server '{url}' refused the login of user 'admin': " \
                                 f"set {USERNAME} and {PASSWORD}, or write USER:PASSWORD@ before the host in " \
                                 f"tracking.mlflow_uri\n"
        assert name not in optuna.get_all_study_names(postgres_url)  # nothing created before the error

        try:
            first = study_run(f"http://admin:{login}@{host}", "--n-trials", "1")
            assert first.exit_code == 0, first.output
            assert (os.environ[USERNAME], os.environ[PASSWORD]) == ("admin", login)
            # A second worker takes the study's stored config, whose URI has no login: it uses the variables.
            second = study_run(None, "--n-trials", "2")
            assert second.exit_code == 0, second.output

            study = optuna.load_study(study_name=name, storage=postgres_url)
            assert study.user_attrs["config"]["tracking"]["mlflow_uri"] == url
            assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
            for secret in (login, storage_secret):
                assert secret not in first.output + second.output + refused.output
                assert _grep_postgres(postgres_url, secret) == []
                assert _grep_files(root, secret) == []  # the MLflow store: runs' params, tags, artifacts
        finally:
            if name in optuna.get_all_study_names(postgres_url):
                optuna.delete_study(study_name=name, storage=postgres_url)
        from mlflow import MlflowClient

        client = MlflowClient(url)  # the login from the variables
        experiment = client.get_experiment_by_name(name)
        (parent,) = client.search_runs([experiment.experiment_id], "tags.`distillstudy.role` = 'study'")
        assert parent.data.params["tracking.mlflow_uri"] == url
        assert parent.data.params["study.storage"] == storage.replace(storage_secret, "***")
        assert [v.version for v in client.search_model_versions(f"name='{name}-best'")]
