"""The bad-input catalogue (issue 14's audit, kept): every bad input a new user or an operator is likely to give,
each through the real CLI, must end in exit code 2, exactly one line `error: ...` (on stderr, nothing else there),
no traceback, and nothing half-written: no study added to the storage, no file or MLflow store created.

Most cases run in-process (Click's CliRunner, fast); a few run as real processes, which is what a user sees.
Storages are real SQLite files and journal files in temporary directories; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
SECRET = "TopSecret"
NO_TRACKING = ["--set", "tracking.enabled=false"]


def url(path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A storage with one study, 'good', created (no trial run): the target of the commands that need a study."""
    path = tmp_path_factory.mktemp("store") / "s.db"
    result = CliRunner().invoke(main, ["study", "create", QUICKSTART, "--name", "good", "--storage", url(path),
                                       *NO_TRACKING], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return url(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory holding the bad files the cases name; MLflow and the storage default point into
    it, so anything a case wrongly creates shows up there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url(tmp_path / "mlflow.db"))
    (tmp_path / "latin1.yaml").write_bytes("study:\n  name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- task\n- model\n")
    (tmp_path / "bad.yaml").write_text("pipeline:\n  seed: [0\n")
    (tmp_path / "dup.yaml").write_text("pipeline:\n  seed: 1\n  batch_size: 8\n  seed: 2\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "notjournal.log").write_text("hello\n")
    sqlite3.connect(tmp_path / "x.db").execute("create table t (a)").connection.close()
    return tmp_path


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def studies(storage_url: str) -> dict:
    summaries = optuna.get_all_study_summaries(storage_url, include_best_trial=False)
    return {s.study_name: s.n_trials for s in summaries}


def assert_one_error_line(exit_code: int, stdout: str, stderr: str, fragments=(), forbidden=()) -> str:
    """Exit 2, stderr exactly one `error: ...` line, no traceback anywhere; returns the line."""
    output = stdout + stderr
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    for f in fragments:
        assert f in lines[0], lines[0]
    for f in forbidden:
        assert f not in output, output
    return lines[0]


TASK = "trial run --config {cfg} --set".split()

# (id, arguments, fragments of the error line, strings that must appear nowhere). Placeholders: {cfg} the
# quickstart config, {store} the storage holding study 'good', {dir} the case's working directory.
CASES = [
    # -- numbers and options Click checks
    ("timeout-0", ["study", "run", "good", "--storage", "{store}", "--timeout", "0"], ["--timeout", "x>0"], []),
    ("timeout-negative", ["study", "run", "good", "--storage", "{store}", "--timeout", "-5"], ["--timeout"], []),
    ("n-trials-0", ["study", "run", "good", "--storage", "{store}", "--n-trials", "0"], ["--n-trials"], []),
    ("n-jobs-0", ["study", "run", "good", "--storage", "{store}", "--n-jobs", "0"], ["--n-jobs"], []),
    ("confirm-seeds-1", ["study", "confirm", "good", "--storage", "{store}", "--seeds", "1"], ["--seeds"], []),
    ("export-format", ["study", "export", "good", "--storage", "{store}", "--format", "xml"], ["'xml'"], []),
    ("replay-number", ["trial", "replay", "good", "seven", "--storage", "{store}"], ["'seven'"], []),
    ("unknown-command", ["study", "frobnicate"], ["frobnicate"], []),
    ("delete-without-yes", ["study", "delete", "good", "--storage", "{store}"], ["--yes"], []),
    ("ui-port-0", ["ui", "--port", "0"], ["--port"], []),
    ("config-is-a-directory", ["trial", "run", "--config", "adir"], ["adir", "directory"], []),
    # -- task.* ranges
    ("val-fraction-1.5", [*TASK, "task.val_fraction=1.5"], ["task.val_fraction", "out of range"], []),
    ("val-fraction-0", [*TASK, "task.val_fraction=0"], ["task.val_fraction", "out of range"], []),
    ("val-fraction-nan", [*TASK, "task.val_fraction=.nan"], ["task.val_fraction"], []),
    ("test-fraction-1", [*TASK, "task.test_fraction=1"], ["task.test_fraction", "out of range"], []),
    ("exit-wait-negative", [*TASK, "tracking.exit_wait=-1"], ["tracking.exit_wait", "out of range"], []),
    ("fractions-sum", [*TASK, "task.val_fraction=0.6", "--set", "task.test_fraction=0.5"],
     ["task.val_fraction + task.test_fraction", "below 1"], []),
    ("labeled-negative", [*TASK, "task.target_labeled_per_class=-1"], ["task.target_labeled_per_class"], []),
    ("max-per-domain-negative", [*TASK, "task.max_per_domain=-3"], ["task.max_per_domain"], []),
    # one image per domain: no validation or test split (accuracies 0/0), and no teacher may be trained or cached
    ("max-per-domain-1", [*TASK, "task.max_per_domain=1", "--set", "pipeline.cache_dir=cache"],
     ["task.max_per_domain=1", "validation and test splits are empty", "at least 4 images, 40 for 10 classes"], []),
    ("image-size-negative", [*TASK, "task.image_size=-1"], ["task.image_size"], []),
    ("imagefolder-without-dirs", [*TASK, "task.name=imagefolder"], ["task.source_dir", "imagefolder"], []),
    ("download-not-bool", [*TASK, "task.download=maybe"], ["task.download", "expected bool"], []),
    ("unknown-task", [*TASK, "task.name=digits-invret"], ["task.name", "digits-invert"], []),
    ("unknown-task-key", [*TASK, "task.val_fractoin=0.2"], ["task.val_fractoin", "val_fraction"], []),
    # -- other config keys
    ("unknown-arch", [*TASK, "model.arch=resnet19"], ["model.arch"], []),
    ("batch-size-0", [*TASK, "pipeline.batch_size=0"], ["pipeline.batch_size"], []),
    ("n-trials-key-0", [*TASK, "study.n_trials=0"], ["study.n_trials"], []),
    ("log-weights", [*TASK, "tracking.log_weights=some"], ["tracking.log_weights"], []),
    ("checkpoint-text-file", [*TASK, "model.teacher=checkpoint", "--set", "model.checkpoint=afile", "--set",
                              "pipeline.cache_dir=cache"], ["not a torch checkpoint: 'afile'", "torch.save"], ["101"]),
    ("set-without-equals", [*TASK, "pipeline.seed"], ["KEY=VALUE"], []),
    ("study-name-key", ["study", "create", "{cfg}", "--storage", "{store}", "--set", "study.name=a/b"],
     ["study.name", "'a/b'"], []),
    ("set-without-config", ["study", "run", "good", "--storage", "{store}", "--set", "pipeline.seed=1"],
     ["--set", "--config"], []),
    # -- study names
    ("name-dotdot-path", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "../../evil"], ["../../evil"],
     []),
    ("name-slash", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "a/b"], ["'a/b'"], []),
    ("name-newline", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "a\nb"], ["'a\\nb'"], []),
    ("name-empty", ["study", "create", "{cfg}", "--storage", "{store}", "--name", ""], ["empty"], []),
    ("name-leading-dot", ["study", "create", "{cfg}", "--storage", "{store}", "--name", ".hidden"], [".hidden"], []),
    ("name-double-dot", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "a..b"], ["a..b"], []),
    ("name-space", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "my study"], ["my study"], []),
    ("name-rule-new-study-limit", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "a b"],
     ["at most 92 characters"], ["100"]),
    ("name-too-long", ["study", "create", "{cfg}", "--storage", "{store}", "--name", "x" * 93], ["at most 92"], []),
    ("run-config-bad-name", ["study", "run", "a/b", "--config", "{cfg}", "--storage", "{store}"], ["'a/b'"], []),
    ("run-bad-name", ["study", "run", "../x", "--storage", "{store}"], ["'../x'"], []),
    ("report-bad-name", ["study", "report", "../../evil", "--storage", "{store}"], ["../../evil"], []),
    ("export-bad-name", ["study", "export", "a/b", "--storage", "{store}"], ["'a/b'"], []),
    ("confirm-bad-name", ["study", "confirm", "a\nb", "--storage", "{store}"], ["'a\\nb'"], []),
    ("replay-bad-name", ["trial", "replay", "../x", "0", "--storage", "{store}"], ["'../x'"], []),
    # -- storage URLs (and passwords, which no output may show)
    ("password-empty-user", ["study", "list", "--storage", f"postgresql://:{SECRET}@127.0.0.1:1/x"],
     [":***@127.0.0.1:1/x"], [SECRET]),
    ("password-with-at", ["study", "list", "--storage", "postgresql://u:Top@Secret@127.0.0.1:1/x"],
     ["u:***@", "%40"], ["Top", "Secret"]),
    ("password-in-query", ["study", "list", "--storage", f"postgresql://u@127.0.0.1:1/x?password={SECRET}"],
     ["password=***"], [SECRET]),
    ("password-create", ["study", "create", "{cfg}", "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/x"],
     ["u:***@"], [SECRET]),
    ("not-a-url", ["study", "list", "--storage", "distillstudy.db"], ["not a URL"], []),
    ("missing-sqlite", ["study", "status", "good", "--storage", "sqlite:///missing.db"], ["does not exist"], []),
    ("sqlite-directory", ["study", "create", "{cfg}", "--storage", "sqlite:///adir"], ["is a directory"], []),
    ("journal-empty", ["study", "create", "{cfg}", "--storage", "journal:"], ["journal:", "file path"], []),
    ("journal-directory", ["study", "create", "{cfg}", "--storage", "journal:adir"], ["is a directory"], []),
    ("journal-sqlite-file", ["study", "list", "--storage", "journal:x.db"], ["SQLite database", "sqlite:///x.db"], []),
    ("journal-sqlite-create", ["study", "create", "{cfg}", "--storage", "journal:x.db"], ["SQLite database"], []),
    ("journal-not-a-journal", ["study", "list", "--storage", "journal:notjournal.log"], ["not an Optuna journal"],
     []),
    # -- files
    ("config-not-utf8", ["trial", "run", "--config", "latin1.yaml"], ["not UTF-8", "0xe9", "line 2"], []),
    ("config-missing", ["trial", "run", "--config", "nope.yaml"], ["not found"], []),
    ("config-malformed", ["trial", "run", "--config", "bad.yaml"], ["not valid YAML at line"], []),
    ("config-duplicate-key", ["trial", "run", "--config", "dup.yaml"],
     ["dup.yaml", "at line 4", "key 'seed' appears twice"], []),
    ("config-a-list", ["study", "create", "list.yaml", "--storage", "{store}"], ["must be a mapping"], []),
    ("report-out-under-a-file", ["study", "report", "good", "--storage", "{store}", "--out", "afile/r"],
     ["cannot create the report folder", "afile/r"], []),
    ("export-out-under-a-file", ["study", "export", "good", "--storage", "{store}", "--out", "afile/t.csv"],
     ["cannot write", "afile/t.csv"], []),
    # -- studies that are not there, or not ready
    ("unknown-study", ["study", "status", "goood", "--storage", "{store}"], ["no study 'goood'", "good"], []),
    ("unknown-trial", ["trial", "replay", "good", "999", "--storage", "{store}"], ["no trial 999"], []),
    ("best-before-any-trial", ["study", "best", "good", "--storage", "{store}"], ["no completed trial"], []),
    ("create-existing", ["study", "create", "{cfg}", "--name", "good", "--storage", "{store}"], ["already exists"], []),
]


def fill(args, store: str) -> list[str]:
    return [a.format(cfg=QUICKSTART, store=store) if "{" in a else a for a in args]


@pytest.mark.parametrize("args,fragments,forbidden", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(args, fragments, forbidden, store, workdir):
    before_files, before_studies = tree(workdir), studies(store)
    result = CliRunner().invoke(main, fill(args, store), catch_exceptions=False)
    assert_one_error_line(result.exit_code, result.stdout, result.stderr, fragments, forbidden)
    assert tree(workdir) == before_files  # no storage, report, export or MLflow store created
    assert studies(store) == before_studies  # no study created, no trial added


def test_the_catalogue_is_large_and_its_ids_unique():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("target", ["file", "directory"])
def test_read_only_storage_is_one_line(target, store, workdir, tmp_path_factory):
    """A read-only SQLite file, or one in a read-only directory: one line before anything is written. Made
    immutable with chattr (chmod does not stop root, who runs CI here)."""
    folder = tmp_path_factory.mktemp("read-only")
    db = folder / "s.db"
    created = CliRunner().invoke(main, ["study", "create", QUICKSTART, "--name", "ro", "--storage", url(db),
                                        *NO_TRACKING], catch_exceptions=False)
    assert created.exit_code == 0, created.output
    locked = db if target == "file" else folder
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext2/3/4, xfs or btrfs)")
    try:
        before = studies(url(db))
        for args in (["study", "run", "ro", "--storage", url(db), "--n-trials", "1"],
                     ["study", "create", QUICKSTART, "--name", "ro2", "--storage", url(db), *NO_TRACKING],
                     ["study", "delete", "ro", "--yes", "--storage", url(db)]):
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            assert_one_error_line(result.exit_code, result.stdout, result.stderr, ["read-only"])
        assert studies(url(db)) == before  # reading still works, and nothing changed
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


NAN_DATASET = """
import torch
from torch.utils.data import TensorDataset


def data():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    bad = x.clone()
    bad[7, 0, 3, 3] = float("nan")
    return TensorDataset(x, y), TensorDataset(bad, y)
"""


def test_nan_images_from_a_user_dataset_are_one_line(workdir, tmp_path_factory, monkeypatch):
    """A NaN pixel would make every loss and accuracy NaN and the run fail far from its cause (exit 1, no error
    line): it is refused where the dataset is read, naming the item, before any teacher is trained or cached."""
    folder = tmp_path_factory.mktemp("user-code")  # outside workdir: importing it writes __pycache__
    module = f"nan_data_{os.getpid()}"
    (folder / f"{module}.py").write_text(NAN_DATASET)
    monkeypatch.syspath_prepend(str(folder))
    before = tree(workdir)
    result = CliRunner().invoke(main, ["trial", "run", "--config", QUICKSTART, "--set", f"task.name={module}:data",
                                       "--set", "model.arch=digitnet", "--set", "pipeline.cache_dir=cache",
                                       "--allow-import", module],
                                catch_exceptions=False)
    sys.modules.pop(module, None)
    assert_one_error_line(result.exit_code, result.stdout, result.stderr,
                          ["the target dataset: item 7", "NaN or infinite"])
    assert tree(workdir) == before


def test_export_out_creates_missing_folders(store, workdir):
    result = CliRunner().invoke(main, ["study", "export", "good", "--storage", store, "--out", "new/dir/t.csv"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (workdir / "new" / "dir" / "t.csv").read_text().startswith("number,state,")


# ---- real processes: what a user's terminal shows ----------------------------------------------------------------
def cli_process(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DISTILLSTUDY_STORAGE", None)
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.mark.parametrize("args,fragments,forbidden", [
    (["study", "run", "good", "--timeout", "0"], ["--timeout"], []),
    (["study", "list", "--storage", f"postgresql://:{SECRET}@127.0.0.1:1/x"], [":***@"], [SECRET]),
], ids=["timeout-0", "password"])
def test_bad_input_in_a_real_process(args, fragments, forbidden, workdir):
    before = tree(workdir)
    proc = cli_process(*args, cwd=workdir)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, fragments, forbidden)
    assert tree(workdir) == before


def test_ctrl_c_with_two_jobs_is_one_line_and_exit_130(workdir, teacher_cache_dir):
    """Two trials on threads, interrupted: no KeyboardInterrupt traceback per thread, the worker's one line,
    exit 130, and the interrupted trials queued again."""
    storage = url(workdir / "s.db")
    sets = ["tracking.enabled=false", "task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1",
            "pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1", "pipeline.distill_epochs=30",
            "pipeline.retrain_epochs=1", "search.generations=0", "study.confirm.top=0", "study.baselines=false",
            "study.pruner.name=none", "study.pruner.kwargs={}", f"pipeline.cache_dir={teacher_cache_dir}",
            f"study.checkpoint_dir={workdir / 'checkpoints'}"]
    created = CliRunner().invoke(main, ["study", "create", QUICKSTART, "--name", "c2", "--storage", storage,
                                        *[a for s in sets for a in ("--set", s)]], catch_exceptions=False)
    assert created.exit_code == 0, created.output
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "study", "run", "c2", "--storage", storage,
                             "--n-jobs", "2", "--quiet"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            running = optuna.load_study(study_name="c2", storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if len(running) == 2:
                break
            time.sleep(0.3)
        time.sleep(1.0)  # both trials inside their training loops
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted" in stdout
    trials = optuna.load_study(study_name="c2", storage=storage).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len([t for t in trials if t.state == optuna.trial.TrialState.WAITING]) >= 1  # queued again
