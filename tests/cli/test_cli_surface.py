"""What a person sees around the commands: masked passwords in every form and every place, bare PostgreSQL URLs in
Optuna's own tools, --version, the options a user expects (ui --host, replay --device), help that names only what a
command takes, rounded values and printed commands that paste into a shell."""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from cli import main
from models.errors import mask_secrets
from study.output import format_epochs_to_threshold, format_list, format_status, format_value
from study.workers.storage import mask_url

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
PG = "127.0.0.1:5432/test"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---- passwords ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,shown", [
    ("postgresql://user:TopSecret@db/optuna", "postgresql://user:***@db/optuna"),
    ("postgresql://:TopSecret@127.0.0.1:1/x", "postgresql://:***@127.0.0.1:1/x"),  # empty user
    ("postgresql://u:Top@Secret@h:5432/x", "postgresql://u:***@h:5432/x"),  # unescaped '@'
    ("postgresql://u:Top/Se?cret@h/x", "postgresql://u:***@h/x"),  # '/' and '?' in the password
    ("postgresql://u:Top%40Secret@h/x", "postgresql://u:***@h/x"),  # escaped '@'
    ("postgresql://u@h/x?password=TopSecret&sslmode=require", "postgresql://u@h/x?password=***&sslmode=require"),
    ("mysql+pymysql://u:TopSecret@h/x?charset=utf8", "mysql+pymysql://u:***@h/x?charset=utf8"),
    ("http://u:TopSecret@mlflow:5000", "http://u:***@mlflow:5000"),
    ("sqlite:///dir/distillstudy.db", "sqlite:///dir/distillstudy.db"),
    ("journal:/shared/studies.log", "journal:/shared/studies.log"),
])
def test_mask_url_hides_every_form_of_password(raw, shown):
    assert mask_url(raw) == shown


def test_messages_quoting_urls_or_dsns_are_masked():
    text = 'failed: "host=db password=TopSecret dbname=x" (postgresql://:TopSecret@db/x, token=TopSecret)'
    assert "TopSecret" not in mask_secrets(text)
    assert "host=db" in mask_secrets(text) and "postgresql://:***@db/x" in mask_secrets(text)


def test_a_password_never_shows_in_messages_listings_or_the_stored_config(postgres_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"masked-{uuid.uuid4().hex[:8]}"
    storage = f"postgresql://postgres:TopSecret@{PG}"  # a bare URL: psycopg 3, SQLAlchemy's default driver
    try:
        created = invoke("study", "create", QUICKSTART, "--name", name, "--storage", storage,
                         "--set", "tracking.enabled=false")
        assert created.exit_code == 0, created.output
        listed = invoke("study", "list", "--storage", storage)
        status = invoke("study", "status", name, "--storage", storage)
        missing = invoke("study", "status", name + "x", "--storage", storage)
        everything = created.output + listed.output + status.output + missing.output
        assert "TopSecret" not in everything
        assert f"postgresql://postgres:***@{PG}" in created.output and name in listed.output
        assert missing.exit_code == 2 and "postgres:***@" in missing.stderr
        stored = optuna.load_study(study_name=name, storage=f"postgresql://postgres@{PG}").user_attrs["config"]
        assert stored["study"]["storage"] == f"postgresql://postgres:***@{PG}"
    finally:
        optuna.delete_study(study_name=name, storage=f"postgresql://postgres@{PG}")


def test_optuna_cli_reads_a_bare_postgresql_url(postgres_url):
    proc = subprocess.run([str(Path(sys.executable).with_name("optuna")), "studies", "--storage",
                           f"postgresql://postgres@{PG}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name" in proc.stdout and "Traceback" not in proc.stderr


def test_psycopg3_is_a_dependency():
    """SQLAlchemy 2.1 maps a bare postgresql:// URL to psycopg 3: without it Optuna's own tools fail on the URLs
    the README prints."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("psycopg[binary]") for d in dependencies), dependencies


# ---- commands and their help -------------------------------------------------------------------------------------
def test_version_names_the_package_version_and_the_libraries():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.startswith(f"distillstudy {version('distillstudy')}+")
    assert f"optuna {optuna.__version__}" in result.output


@pytest.mark.parametrize("command,option", [(["ui"], "--host"), (["trial", "replay"], "--device")])
def test_expected_options_exist(command, option):
    assert option in invoke(*command, "--help").output


@pytest.mark.parametrize("command", ["list", "status", "best", "export", "delete", "report", "compare"])
def test_help_of_commands_without_a_config_mentions_no_config(command):
    assert "config" not in invoke("study", command, "--help").output.lower()


def test_the_worker_hint_pastes_into_a_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my dir").mkdir()
    storage = f"sqlite:///{tmp_path / 'my dir' / 's.db'}"
    result = invoke("study", "create", QUICKSTART, "--name", "q.v1", "--storage", storage,
                    "--set", "tracking.enabled=false")
    assert result.exit_code == 0, result.output
    hint = result.output.splitlines()[-1].removeprefix("run a worker: ")
    assert shlex.split(hint) == ["distillstudy", "study", "run", "q.v1", "--storage", storage]


def test_pretrained_without_weights_names_the_real_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("trial", "run", "--config", QUICKSTART, "--set", "model.teacher=pretrained",
                    "--set", "task.max_per_domain=300", "--set", f"pipeline.cache_dir={tmp_path / 'cache'}")
    assert result.exit_code == 2 and "model.teacher" in result.stderr and "teacher.source" not in result.stderr


# ---- what the listings print -------------------------------------------------------------------------------------
def test_values_are_rounded_and_missing_ones_say_so():
    assert format_value(0.8613333333333334) == "0.8613"
    assert format_value([0.8613333333333334, 12345.0]) == "[0.8613, 12345]"
    assert format_value(None) == "-"
    row = {"name": "s", "COMPLETE": 1, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0,
           "best": 0.8613333333333334}
    assert format_list([row]).splitlines()[1].endswith(" 0.8613")
    status = format_status({"name": "s", "counts": {"COMPLETE": 1}, "best": 0.8613333333333334, "running": []})
    assert "best so far: 0.8613" in status
    assert format_epochs_to_threshold(None) == "not reached" and format_epochs_to_threshold(3) == "3"
