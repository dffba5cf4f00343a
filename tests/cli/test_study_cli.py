"""The study commands end to end through the real CLI: real SQLite storages in temporary directories, real tiny
training (1 epoch per stage, 300 images per domain), MLflow off (it is tested elsewhere). Nothing is mocked."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from tiny import TINY, options

from cli import main

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def tiny(cache_dir, workdir) -> list[str]:
    """`--set` options for a trial of about a second, with every file under the test's directories."""
    return options([*TINY, "tracking.enabled=false", f"pipeline.cache_dir={cache_dir}",
                    f"study.checkpoint_dir={Path(workdir) / 'checkpoints'}"])


def url(path) -> str:
    return f"sqlite:///{path}"


def cli(*args):
    """Invoke the real CLI in-process; exceptions other than exits propagate (so bugs show as tracebacks)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments) -> str:
    """Exit code 2 and exactly one line 'error: ...' on stderr; returns that line."""
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in line, line
    return line


def load(name, storage_url) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own empty directory, with no storage from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)


@pytest.fixture(scope="module")
def t1(tmp_path_factory, teacher_cache_dir):
    """Study 't1' created from the quickstart config, run to 5 trials, then resumed to a total of 7."""
    work = tmp_path_factory.mktemp("t1")
    storage = url(work / "s.db")
    sets = [*tiny(teacher_cache_dir, work), "--set", "search.generations=[0, 1]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.delenv("DISTILLSTUDY_STORAGE", raising=False)
        created = cli("study", "create", QUICKSTART, "--name", "t1", "--storage", storage, *sets)
        assert created.exit_code == 0, created.output
        waiting = [(t.number, t.user_attrs) for t in load("t1", storage).get_trials()]
        first = cli("study", "run", "t1", "--storage", storage, "--n-trials", 5)
        assert first.exit_code == 0, first.output
        after_first = [t.state for t in load("t1", storage).get_trials()]
        second = cli("study", "run", "t1", "--storage", storage, "--n-trials", 7, "--verbose")
        assert second.exit_code == 0, second.output
    return {"storage": storage, "work": work, "sets": sets, "created": created, "waiting": waiting,
            "first": first, "after_first": after_first, "second": second}


# ---- create ------------------------------------------------------------------------------------------------------
def test_create_stores_config_and_queues_baselines(tmp_path, teacher_cache_dir):
    storage, sets = url(tmp_path / "s.db"), tiny(teacher_cache_dir, tmp_path)
    result = cli("study", "create", QUICKSTART, "--name", "c1", "--storage", storage, *sets)
    assert result.exit_code == 0, result.output
    assert "created study 'c1'" in result.output and "3 baseline trials queued" in result.output
    study = load("c1", storage)
    config = study.user_attrs["config"]
    assert config["pipeline"]["finetune_epochs"] == 1 and config["tracking"]["enabled"] is False
    assert config["study"]["name"] == "c1" and config["task"]["name"] == "digits-invert"
    assert study.user_attrs["objective"] == ["target_val_acc"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.WAITING] * 3
    assert [t.user_attrs["baseline"] for t in trials] == ["finetune-all", "head-only", "finetune-all-kd"]

    # Creating again refuses; --load-if-exists with the same config reuses it; a different config refuses.
    again = cli("study", "create", QUICKSTART, "--name", "c1", "--storage", storage, *sets)
    assert_user_error(again, "already exists", "--load-if-exists")
    reuse = cli("study", "create", QUICKSTART, "--name", "c1", "--storage", storage, *sets, "--load-if-exists")
    assert reuse.exit_code == 0 and "loaded existing study 'c1'" in reuse.output
    # How long a worker waits (for its database, or stopping, for its tracking writes) is not the study's identity.
    waits = cli("study", "create", QUICKSTART, "--name", "c1", "--storage", storage, *sets, "--load-if-exists",
                "--set", "study.storage_retry=5", "--set", "tracking.exit_wait=3")
    assert waits.exit_code == 0 and "loaded existing study 'c1'" in waits.output, waits.output
    other = cli("study", "create", QUICKSTART, "--name", "c1", "--storage", storage, *sets, "--load-if-exists",
                "--set", "search.alpha=0.7")
    assert_user_error(other, "different config")
    assert len(load("c1", storage).get_trials()) == 3  # nothing enqueued twice


# ---- run, resume, stored attributes ------------------------------------------------------------------------------
def test_run_reaches_exact_totals(t1):
    assert t1["waiting"] and all("baseline" in attrs for _, attrs in t1["waiting"])
    assert sum(s in FINISHED for s in t1["after_first"]) == 5
    study = load("t1", t1["storage"])
    assert len(study.get_trials(states=FINISHED)) == 7  # --n-trials is the total, not 7 more
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert "running to 5 finished trials" in t1["first"].output
    assert "[  5/5]" in t1["first"].output and "[  7/7]" in t1["second"].output
    assert "winner:" in t1["second"].output


def test_stored_trial_attributes(t1):
    study = load("t1", t1["storage"])
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) >= 3
    assert {t.user_attrs.get("baseline") for t in study.get_trials()[:3]} == {"finetune-all", "head-only",
                                                                              "finetune-all-kd"}
    teacher_vals = set()
    for t in complete:
        a = t.user_attrs
        assert set(a["choices"]) >= {"layers.stem", "layers.head", "alpha", "lr", "recipe"}
        want = {"finetune": {"teacher", "finetune"}, "distill": {"teacher", "finetune", "distill"}}
        assert want[a["choices"]["recipe"]] <= set(a["stages"])
        for stage in a["stages"].values():
            for key in ("source_val_acc", "target_val_acc", "target_test_acc"):
                assert 0.0 <= stage[key] <= 1.0
        assert a["best_stage"] in a["stages"] and a["best_stage"] != "teacher" and a["select"] == "best"
        assert t.value == a["stages"][a["best_stage"]]["target_val_acc"]
        assert isinstance(a["student_params"], int) and a["student_params"] > 0
        assert a["seconds"] > 0
        # One step per student epoch, each stage on its own block of steps; the teacher (step 0) is not reported.
        steps = [s for name, st in a["stages"].items() if name != "teacher"
                 for s in range(st["first_step"], st["first_step"] + st["epochs"])]
        assert sorted(t.intermediate_values) == steps and steps[-1] <= a["budget"]
        assert len(steps) == a["total_epochs"] >= 2
        teacher_vals.add(a["stages"]["teacher"]["target_val_acc"])
    assert len(teacher_vals) == 1  # the same teacher for every trial
    baseline = {t.user_attrs["baseline"]: t for t in complete if "baseline" in t.user_attrs}
    ft = baseline["finetune-all"].user_attrs
    assert (ft["choices"]["alpha"], ft["choices"]["recipe"]) == (0.0, "finetune")
    assert set(ft["stages"]) == {"teacher", "finetune"}
    assert ft["stages"]["finetune"]["epochs"] == ft["total_epochs"] == ft["budget"] == \
        baseline["finetune-all-kd"].user_attrs["budget"]
    head = baseline["head-only"].user_attrs["choices"]
    assert [head[f"layers.{g}"] for g in ("stem", "block1", "block2", "head")] == \
           ["freeze", "freeze", "freeze", "finetune"]
    for t in study.get_trials(states=(optuna.trial.TrialState.PRUNED,)):
        assert "pruned_at" in t.user_attrs or "failure" in t.user_attrs


def test_list_status_best(t1):
    storage = t1["storage"]
    listed = cli("study", "list", "--storage", storage)
    assert listed.exit_code == 0 and "t1" in listed.output and "complete" in listed.output
    rows = json.loads(cli("study", "list", "--storage", storage, "--json").output)
    assert [r["name"] for r in rows] == ["t1"] and rows[0]["COMPLETE"] + rows[0]["PRUNED"] == 7
    status = cli("study", "status", "t1", "--storage", storage)
    assert status.exit_code == 0 and "study 't1'" in status.output and "best so far" in status.output
    data = json.loads(cli("study", "status", "t1", "--storage", storage, "--json").output)
    assert data["counts"]["COMPLETE"] + data["counts"]["PRUNED"] == 7 and data["running"] == []
    assert data["best"] == load("t1", storage).best_value
    best = cli("study", "best", "t1", "--storage", storage)
    assert best.exit_code == 0, best.output
    assert "winner:" in best.output and "layers: stem=" in best.output
    for name in ("finetune-all", "head-only", "finetune-all-kd"):
        assert f"baseline {name}:" in best.output
    data = json.loads(cli("study", "best", "t1", "--storage", storage, "--json").output)
    assert data["best"]["number"] == load("t1", storage).best_trial.number
    assert {b["baseline"] for b in data["baselines"]} == {"finetune-all", "head-only", "finetune-all-kd"}


def test_export_csv_and_json(t1, tmp_path):
    storage = t1["storage"]
    n_trials = len(load("t1", storage).get_trials())
    result = cli("study", "export", "t1", "--storage", storage, "--format", "csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == n_trials
    for col in ("number", "state", "values", "baseline", "best_stage", "epochs", "budget", "choice.layers.head",
                "choice.alpha", "choice.recipe", "teacher.target_val_acc", "finetune.source_val_acc",
                "distill.target_test_acc"):
        assert col in rows[0], col
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert complete and all(json.loads(r["values"])[0] == float(r[f"{r['best_stage']}.target_val_acc"])
                            for r in complete)
    data = json.loads(cli("study", "export", "t1", "--storage", storage, "--format", "json").output)
    assert [r["number"] for r in data] == list(range(n_trials))
    assert {r["state"] for r in data} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert all(isinstance(r["distill.target_val_acc"], float) for r in data
               if r["state"] == "COMPLETE" and r["choice.recipe"] == "distill")
    # The finetune-all baseline: no distill or retrain stage, the epoch budget of a default trial.
    ft = next(r for r in data if r["baseline"] == "finetune-all")
    assert not any(k.startswith(("distill.", "retrain-")) for k in ft)
    assert ft["epochs"] == ft["budget"] == next(r for r in data if r["baseline"] == "finetune-all-kd")["budget"]
    out = tmp_path / "trials.json"
    assert cli("study", "export", "t1", "--storage", storage, "--format", "json", "--out", out).exit_code == 0
    assert json.loads(out.read_text()) == data


@pytest.mark.slow  # Optuna's own CLI in a process
def test_optuna_cli_reads_the_storage(t1):
    optuna_bin = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(optuna_bin), "trials", "--study-name", "t1", "--storage", t1["storage"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "COMPLETE" in proc.stdout


def test_replay_reproduces_stored_value(t1):
    study = load("t1", t1["storage"])
    trial = max((t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                 if not t.user_attrs.get("baseline")), key=lambda t: t.value, default=study.best_trial)
    result = cli("trial", "replay", "t1", trial.number, "--storage", t1["storage"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["stored_value"] == trial.value
    assert data["value"] == trial.value  # bit-identical on CPU
    assert data["model_hash"] == data["stored_model_hash"] == trial.user_attrs["model_hash"]
    assert data["identical"] is True and data["differences"] == [] and data["delta"] == 0.0
    text = cli("trial", "replay", "t1", trial.number, "--storage", t1["storage"])
    assert "identical (value, weights, " in text.output and "DIFFERENT" not in text.output
    missing = cli("trial", "replay", "t1", 999, "--storage", t1["storage"])
    assert_user_error(missing, "no trial 999")


def test_replay_says_different_when_the_stored_weights_or_curve_differ(t1, tmp_path):
    """`identical` means bit for bit: a stored record whose weights hash or one per-epoch accuracy differs from
    the replay's (here edited in a copy of the storage) is reported DIFFERENT, naming what differs."""
    import sqlite3

    db = tmp_path / "copy.db"
    with sqlite3.connect(Path(t1["work"]) / "s.db") as source, sqlite3.connect(db) as copy:
        source.backup(copy)  # the write-ahead log included
    study = load("t1", url(db))
    trial = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.intermediate_values)
    step = max(trial.intermediate_values)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'model_hash'",
                    (json.dumps("0" * 16), trial._trial_id))
        con.execute("UPDATE trial_intermediate_values SET intermediate_value = ? WHERE trial_id = ? AND step = ?",
                    (trial.intermediate_values[step] + 0.5, trial._trial_id, step))
    data = json.loads(cli("trial", "replay", "t1", trial.number, "--storage", url(db), "--json").output)
    assert data["value"] == data["stored_value"] and data["identical"] is False
    assert [d.split(" (")[0].split(":")[0] for d in data["differences"]] == \
        ["weights differ", f"target val acc at step {step}"]
    text = cli("trial", "replay", "t1", trial.number, "--storage", url(db)).output
    assert "DIFFERENT: weights differ (model_hash 0000000000000000 stored, " in text and "identical" not in text


def test_delete(tmp_path, teacher_cache_dir):
    storage = url(tmp_path / "s.db")
    assert cli("study", "create", QUICKSTART, "--name", "gone", "--storage", storage,
               *tiny(teacher_cache_dir, tmp_path)).exit_code == 0
    assert cli("study", "delete", "gone", "--storage", storage).exit_code == 2  # --yes is required
    result = cli("study", "delete", "gone", "--storage", storage, "--yes")
    assert result.exit_code == 0 and "deleted study 'gone'" in result.output
    assert optuna.get_all_study_names(storage) == []
    assert_user_error(cli("study", "delete", "gone", "--storage", storage, "--yes"), "no study 'gone'")
    assert cli("study", "list", "--storage", storage).output.strip() == "no studies"


def test_delete_asks_first_and_the_storage_comes_from_the_environment(tmp_path, teacher_cache_dir, monkeypatch):
    storage = url(tmp_path / "s.db")
    assert cli("study", "create", QUICKSTART, "--name", "gone", "--storage", storage,
               *tiny(teacher_cache_dir, tmp_path)).exit_code == 0
    monkeypatch.setenv("DISTILLSTUDY_STORAGE", storage)  # every --storage option's default
    assert "gone" in cli("study", "list").output
    declined = CliRunner().invoke(main, ["study", "delete", "gone"], input="n\n")
    assert declined.exit_code == 2 and optuna.get_all_study_names(storage) == ["gone"]
    assert CliRunner().invoke(main, ["study", "delete", "gone"], input="y\n").exit_code == 0
    assert optuna.get_all_study_names(storage) == []
    assert cli("study", "list").output.strip() == "no studies"
    assert_user_error(cli("study", "list", "--storage", url(tmp_path / "other.db")), "does not exist")  # it wins


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_unknown_study_and_missing_storage(t1, tmp_path):
    assert_user_error(cli("study", "status", "nope", "--storage", t1["storage"]), "no study 'nope'", "t1")
    assert_user_error(cli("study", "status", "t", "--storage", t1["storage"]), "did you mean 't1'")
    missing = tmp_path / "missing.db"
    for args in (["study", "status", "x"], ["study", "best", "x"], ["study", "list"], ["study", "export", "x"],
                 ["study", "run", "x"]):
        assert_user_error(cli(*args, "--storage", url(missing)), "does not exist")
        assert not missing.exists(), args
    assert list(tmp_path.iterdir()) == []


def test_bad_config_creates_nothing(tmp_path, teacher_cache_dir):
    db = tmp_path / "s.db"
    sets = tiny(teacher_cache_dir, tmp_path)
    line = assert_user_error(cli("study", "create", QUICKSTART, "--name", "b", "--storage", url(db), *sets,
                                 "--set", "task.nmae=x"), "task.nmae", "did you mean 'name'")
    assert "unknown key" in line
    assert_user_error(cli("study", "create", QUICKSTART, "--name", "b", "--storage", url(db), *sets,
                          "--set", "study.sampler.name=tpee"), "unknown sampler 'tpee'", "did you mean 'tpe'")
    assert_user_error(cli("study", "create", QUICKSTART, "--name", "b", "--storage", url(db), *sets,
                          "--set", "study.pruner.kwargs={n_startup: 2}"), "study.pruner.kwargs")
    assert not db.exists()
    # With an existing storage, a refused config leaves no study behind either.
    assert cli("study", "create", QUICKSTART, "--name", "ok", "--storage", url(db), *sets).exit_code == 0
    assert_user_error(cli("study", "create", QUICKSTART, "--name", "b", "--storage", url(db), *sets,
                          "--set", "study.sampler.name=tpee"))
    assert_user_error(cli("study", "run", "--config", QUICKSTART, "--storage", url(db), *sets,
                          "--set", "search.nope=1"), "search.nope")
    assert optuna.get_all_study_names(url(db)) == ["ok"]


def test_unreachable_storage_hides_password(teacher_cache_dir, tmp_path):
    storage = "postgresql://postgres:secret@127.0.0.1:1/test"
    result = cli("study", "create", QUICKSTART, "--name", "p", "--storage", storage,
                 *tiny(teacher_cache_dir, tmp_path))
    line = assert_user_error(result, "cannot open storage", "postgres:***@127.0.0.1:1")
    assert "secret" not in result.output and "secret" not in line
    status = cli("study", "status", "p", "--storage", storage)
    assert_user_error(status)
    assert "secret" not in status.output


# ---- multi-objective ---------------------------------------------------------------------------------------------
def test_multi_objective_pareto_front(tmp_path, teacher_cache_dir):
    storage = url(tmp_path / "mo.db")
    sets = [*tiny(teacher_cache_dir, tmp_path), "--set", "study.objective=[target_val_acc, student_params]"]
    assert cli("study", "create", QUICKSTART, "--name", "mo", "--storage", storage, *sets).exit_code == 0
    study = load("mo", storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    result = cli("study", "run", "mo", "--storage", storage, "--n-trials", 3)
    assert result.exit_code == 0, result.output
    trials = load("mo", storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and not [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    for t in complete:
        assert t.values[1] == t.user_attrs["student_params"] and not t.intermediate_values
    best = cli("study", "best", "mo", "--storage", storage)
    assert best.exit_code == 0 and "Pareto front (target_val_acc, student_params)" in best.output
    data = json.loads(cli("study", "best", "mo", "--storage", storage, "--json").output)
    assert {r["number"] for r in data["pareto_front"]} == {t.number for t in load("mo", storage).best_trials}


# ---- interrupt ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a worker process interrupted mid-trial
def test_interrupt_marks_fail_requeues_and_resumes(tmp_path, teacher_cache_dir):
    storage = url(tmp_path / "int.db")
    sets = [*tiny(teacher_cache_dir, tmp_path), "--set", "pipeline.finetune_epochs=40", "--set",
            "study.baselines=false", "--set", "search.layers.head=finetune", "--set", "search.alpha=0.5"]
    assert cli("study", "create", QUICKSTART, "--name", "i", "--storage", storage, *sets).exit_code == 0
    cmd = [sys.executable, str(REPO / "cli.py"), "study", "run", "i", "--storage", storage, "--n-trials", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DISTILLSTUDY_STORAGE", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # One storage for the polls: opening one per poll (an engine and alembic's schema check) takes long enough on a
    # loaded machine for the whole 40-epoch trial to slip between two polls.
    watch = optuna.load_study(study_name="i", storage=optuna.storages.RDBStorage(storage))
    try:
        deadline = time.monotonic() + 120
        running = None
        while time.monotonic() < deadline and proc.poll() is None:
            running = [t for t in watch.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if len(t.intermediate_values) >= 2]  # in the middle of the student's epochs
            if running:
                break
            time.sleep(0.05)
        assert running, f"no trial got to training: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in out
    trials = load("i", storage).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    failed = trials[0]
    assert failed.state == optuna.trial.TrialState.FAIL and "interrupted" in failed.user_attrs["failure"]
    retry = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].user_attrs["retry_of"] == 0
    assert retry[0].system_attrs["fixed_params"] == failed.params  # the same parameters, enqueued

    # The same command again continues to the total, running the retry with the same parameters.
    result = cli("study", "run", "i", "--storage", storage, "--n-trials", 1)
    assert result.exit_code == 0, result.output
    trials = load("i", storage).get_trials()
    done = [t for t in trials if t.state in FINISHED]
    assert len(done) == 1 and done[0].number == retry[0].number and done[0].params == failed.params
    assert [t.state for t in trials].count(optuna.trial.TrialState.FAIL) == 1


# Issue 24 (replay exact under --n-jobs): about 30-50 s. Fails only sometimes when broken (a race), so a red run
# here is never noise: each of the 8 trials must replay to the same value AND the same weights (model_hash).
def test_every_trial_of_a_two_thread_study_replays_exactly(tmp_path, teacher_cache_dir, mlflow_sqlite):
    """Trial threads share one process: each trial's randomness (initialisation of replaced groups, batch order,
    augmentation) must come from its own seeds alone, and nothing another thread does (the tracker exporting the
    best model with torch.export, which switches oneDNN off and restores the global generator) may reach its
    training, so a replay gives the stored value and weights bit for bit. Tracking is on, with the best model
    registered, as a new user's study runs."""
    storage = url(tmp_path / "s.db")
    run = cli("study", "run", "mt", "--config", QUICKSTART, "--storage", storage,
              *tiny(teacher_cache_dir, tmp_path), "--set", "search.generations=[0, 1]",
              "--set", "study.pruner.name=none", "--set", "study.pruner.kwargs={}",
              "--set", "pipeline.replace_with=slim", "--set", "tracking.enabled=true",
              "--set", f"tracking.mlflow_uri={mlflow_sqlite}", "--set", "tracking.log_weights=best",
              "--set", "tracking.register_best=true", "--n-trials", 8, "--n-jobs", 2, "--quiet")
    assert run.exit_code == 0, run.output
    complete = load("mt", storage).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 8
    assert any("replace" in t.user_attrs["choices"].values() for t in complete)  # replaced groups were drawn
    differ = []
    for t in complete:
        replayed = json.loads(cli("trial", "replay", "mt", t.number, "--storage", storage, "--json").output)
        assert replayed["stored_value"] == t.value
        if (replayed["value"], replayed["model_hash"]) != (t.value, t.user_attrs["model_hash"]):
            differ.append((t.number, t.value, replayed["value"], t.user_attrs["model_hash"], replayed["model_hash"]))
    assert not differ, f"trials whose replay differs (number, stored, replayed, stored/replayed hash): {differ}"


def test_a_choice_that_leaves_a_stage_without_data_fails_with_the_reason(tmp_path, teacher_cache_dir):
    storage = url(tmp_path / "s.db")
    run = cli("study", "run", "nodata", "--config", QUICKSTART, "--storage", storage,
              *tiny(teacher_cache_dir, tmp_path), "--set", "task.target_labeled_per_class=0",
              "--set", "search.source_weight=[0.0, 0.5]", "--set", "study.baselines=false", "--n-trials", 3)
    assert run.exit_code == 0, run.output
    trials = load("nodata", storage).get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["source_weight"] == 0.0 for t in failed)
    for t in failed:
        assert t.user_attrs["failure"] == ("invalid input: stage 'finetune' would train on no data: no labelled "
                                           "target images (task.target_labeled_per_class is 0); "
                                           "search.source_weight is 0")
        assert "stages" not in t.user_attrs
    assert len([t for t in trials if t.state in FINISHED]) == 3  # the study went on to its total


def test_baselines_are_never_pruned(tmp_path, teacher_cache_dir):
    # A pruner with no start-up trials and no warm-up would stop head-only (a linear probe, far below finetune-all)
    # at its first step; a baseline is the reference every winner is read against, so it always finishes.
    storage = url(tmp_path / "s.db")
    run = cli("study", "run", "ref", "--config", QUICKSTART, "--storage", storage, *tiny(teacher_cache_dir, tmp_path),
              "--set", "pipeline.teacher_epochs=10", "--set", "pipeline.finetune_epochs=3",
              "--set", "study.pruner.name=median",
              "--set", "study.pruner.kwargs={n_startup_trials: 0, n_warmup_steps: 0}", "--n-trials", 3)
    assert run.exit_code == 0, run.output
    trials = {t.user_attrs["baseline"]: t for t in load("ref", storage).get_trials()}
    assert {b: t.state.name for b, t in trials.items()} == dict.fromkeys(trials, "COMPLETE")
    assert trials["head-only"].value < trials["finetune-all"].value
    assert all(len(t.intermediate_values) == t.user_attrs["total_epochs"] for t in trials.values())
