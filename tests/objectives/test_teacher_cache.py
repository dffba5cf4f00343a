"""The teacher cache under faults, and what the worker does with a trial its infrastructure failed.

- A truncated (or otherwise damaged) `.pt` entry is detected by its recorded size and sha256, retrained under the
  lock and replaced, with a warning naming the file; `study run` then completes its baselines with real values.
- An enqueued baseline failed by its worker (here: `pipeline.cache_dir` is a file, so no teacher can be cached)
  is queued again instead of being used up; once the fault is fixed, the next worker runs all three baselines.
- A teacher near chance on its own source gets a warning; a cache hit is reported once per process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from tiny import TINY, options

from cli import main
from objectives import teacher as teacher_module
from objectives.pipeline import get_task
from objectives.teacher import get_teacher

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
S = optuna.trial.TrialState


def tiny(cache_dir, workdir) -> list[str]:
    return options([*TINY, "tracking.enabled=false", f"pipeline.cache_dir={cache_dir}",
                    f"study.checkpoint_dir={Path(workdir) / 'checkpoints'}"])


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)


def _teacher(config_model, pipeline, tiny_task):
    import torch

    task = get_task(tiny_task(), pipeline.seed, torch.device("cpu"))
    return get_teacher("teacher", config_model.arch, config_model.width, task, config_model, pipeline,
                       torch.device("cpu"))


@pytest.fixture
def model():
    from study.config.config import load_config

    return load_config(QUICKSTART, []).model


def test_truncated_entry_is_retrained_and_replaced_with_a_warning(tmp_path, tiny_pipeline, tiny_task, model, caplog):
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "cache"))
    _, first = _teacher(model, pipeline, tiny_task)
    weights = Path(first.path)
    stamp = json.loads(weights.with_suffix(".json").read_text())["file"]
    assert stamp["size"] == weights.stat().st_size and len(stamp["sha256"]) == 64
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # a truncated copy
    with caplog.at_level(logging.WARNING, logger="objectives.teacher"):
        _, again = _teacher(model, pipeline, tiny_task)
    assert again.cache == "miss"  # retrained, not loaded
    assert any(str(weights) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert weights.read_bytes() == good  # the same key trains the same teacher, bit for bit
    assert not list(weights.parent.glob("*.tmp*"))  # replaced atomically, nothing left behind

    # Same size, different bytes (a flipped bit): only the hash can tell.
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="objectives.teacher"):
        _, third = _teacher(model, pipeline, tiny_task)
    assert third.cache == "miss" and "sha256" in caplog.text
    _, fourth = _teacher(model, pipeline, tiny_task)
    assert fourth.cache == "hit"


def test_study_run_with_a_truncated_cache_completes_its_baselines(tmp_path):
    storage, sets = f"sqlite:///{tmp_path / 's.db'}", tiny(tmp_path / "cache", tmp_path)
    assert cli("study", "create", QUICKSTART, "--name", "tc", "--storage", storage, *sets).exit_code == 0
    first = cli("study", "run", "tc", "--storage", storage, "--n-trials", 1)
    assert first.exit_code == 0, first.output
    (weights,) = (tmp_path / "cache").glob("teacher-*.pt")
    weights.write_bytes(weights.read_bytes()[:1000])

    second = cli("study", "run", "tc", "--storage", storage, "--n-trials", 3)
    assert second.exit_code == 0, second.output
    assert "Traceback" not in second.output
    assert f"cache file {weights} is corrupt" in second.stderr
    assert "training the teacher" in second.stdout  # a line while the bar would otherwise sit at 0
    trials = optuna.load_study(study_name="tc", storage=storage).get_trials()
    baselines = {t.user_attrs["baseline"]: t for t in trials if t.user_attrs.get("baseline")}
    assert set(baselines) == {"finetune-all", "head-only", "finetune-all-kd"}
    assert all(t.state == S.COMPLETE and 0 < t.value <= 1 for t in baselines.values()), \
        [(t.number, t.state, t.user_attrs.get("failure")) for t in trials]


def test_a_baseline_failed_by_its_worker_is_queued_again(tmp_path):
    cache = tmp_path / "cache"
    storage, sets = f"sqlite:///{tmp_path / 's.db'}", tiny(cache, tmp_path)
    assert cli("study", "create", QUICKSTART, "--name", "rq", "--storage", storage, *sets).exit_code == 0
    cache.write_text("not a directory")  # an infrastructure fault: no teacher can be cached

    broken = cli("study", "run", "rq", "--storage", storage, "--n-trials", 3)
    assert broken.exit_code == 2 and "in a row failed" in broken.stderr, broken.output
    trials = optuna.load_study(study_name="rq", storage=storage).get_trials()
    assert all(t.state in (S.FAIL, S.WAITING) for t in trials)
    waiting = [t.user_attrs.get("baseline") for t in trials if t.state == S.WAITING]
    assert sorted(waiting) == ["finetune-all", "finetune-all-kd", "head-only"]  # none used up
    failed = [t for t in trials if t.state == S.FAIL]
    assert all(t.user_attrs["failure"].endswith("; queued again") for t in failed if t.user_attrs.get("baseline"))

    cache.unlink()  # the operator fixes the fault
    fixed = cli("study", "run", "rq", "--storage", storage, "--n-trials", 3)
    assert fixed.exit_code == 0, fixed.output
    trials = optuna.load_study(study_name="rq", storage=storage).get_trials()
    done = {t.user_attrs["baseline"]: t for t in trials if t.state == S.COMPLETE}
    assert set(done) == {"finetune-all", "head-only", "finetune-all-kd"}
    assert all(0 < t.value <= 1 and t.user_attrs["retry_of"] is not None for t in done.values())


def test_requeueing_stops_after_max_retry_copies(tmp_path):
    """A failure that recurs on every copy ends: with study.max_retry 1 each baseline is queued again once."""
    cache = tmp_path / "cache"
    storage, sets = f"sqlite:///{tmp_path / 's.db'}", [*tiny(cache, tmp_path), "--set", "study.max_retry=1"]
    assert cli("study", "create", QUICKSTART, "--name", "rq1", "--storage", storage, *sets).exit_code == 0
    cache.write_text("not a directory")  # the fault stays: every copy fails the same way
    for _ in range(2):  # the first run queues each baseline once more, the second fails the copies for good
        assert cli("study", "run", "rq1", "--storage", storage, "--n-trials", 3).exit_code == 2
    trials = optuna.load_study(study_name="rq1", storage=storage).get_trials()
    copies = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(copies) == 6 and all(t.state == S.FAIL for t in copies), [(t.number, t.state) for t in copies]
    assert max(t.user_attrs.get("requeues", 0) for t in copies) == 1


def test_a_teacher_near_chance_is_warned_about_and_a_hit_is_said_once(tmp_path, tiny_pipeline, tiny_task, model,
                                                                     caplog):
    # No source epochs: the teacher is its random initialisation, at chance on the source.
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "cache"), teacher_epochs=0)
    with caplog.at_level(logging.INFO, logger="objectives.teacher"):
        _, info = _teacher(model, pipeline, tiny_task)
        _teacher(model, pipeline, tiny_task)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("training the teacher") for m in messages), messages
    assert sum("near chance" in m for m in messages) == 1, messages
    assert not any("loaded from cache" in m for m in messages)  # this process trained it: nothing new to say

    teacher_module._announced.clear()  # as in a new worker process: the first hit is said, later ones are not
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="objectives.teacher"):
        _teacher(model, pipeline, tiny_task)
        _teacher(model, pipeline, tiny_task)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("loaded from cache" in m for m in messages) == 1 and sum("near chance" in m for m in messages) == 1

    # The rule: below 1.5x chance (15% for 10 classes).
    caplog.clear()
    for acc in (0.149, 0.151):
        teacher_module._warn_if_near_chance(dataclasses.replace(info, source_val_acc=acc), 10)
    assert [r.getMessage().split("acc ")[1][:6] for r in caplog.records] == ["0.1490"]


def test_trial_run_warns_about_an_imagefolder_teacher_at_chance(tmp_path):
    # 20 random-pixel images per class: nothing to learn, so the teacher's source val acc is at chance.
    from test_tasks_folder import write_domain

    write_domain(tmp_path / "src", "RGB", (16, 16), seed=0, per_class=20)
    write_domain(tmp_path / "tgt", "RGB", (16, 16), seed=1, per_class=20)
    config = {
        "task": {"name": "imagefolder", "source_dir": str(tmp_path / "src"), "target_dir": str(tmp_path / "tgt"),
                 "image_size": 16, "target_labeled_per_class": 2},
        "pipeline": {"device": "cpu", "cpu_threads": 1, "batch_size": 8, "teacher_epochs": 1, "finetune_epochs": 1,
                     "distill_epochs": 1, "retrain_epochs": 1, "cache_dir": str(tmp_path / "cache")},
        "search": {"generations": [0]}, "tracking": {"enabled": False},
    }
    (tmp_path / "folder.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = cli("trial", "run", "--config", tmp_path / "folder.yaml")
    assert result.exit_code == 0, result.output
    assert "is near chance (1/2 = 0.5000" in result.stderr, result.stderr
    assert "value: target val acc" in result.stdout
