"""Confirmation across splits and teachers (`study.confirm.resample`): with `splits` each confirmation seed has its
own train/val/test split and its own teacher, shared by every configuration on that seed (the comparison stays
paired); with `none` every seed keeps the study's split and teacher. Real SQLite storage, real training on tiny
data; the splits and teacher keys are checked against ones computed independently from the task."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import defaultdict
from pathlib import Path

import optuna
from click.testing import CliRunner

from cli import main
from objectives.tasks import load_task
from objectives.teacher import cache_key
from study.confirm.confirmation import confirm_name, prepare
from study.workers.studies import load_study
from study.workers.worker import run_worker

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
# One sampled trial of about a second, then 1 top configuration + 3 baselines on 2 fresh seeds.
TINY = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1",
        "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1",
        "search.generations=0", "study.baselines=false", "study.pruner.name=none", "study.pruner.kwargs={}",
        "tracking.enabled=false", "study.confirm.top=1", "study.confirm.seeds=2"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def runs_by_seed(companion: optuna.Study) -> dict[int, list[dict]]:
    """The companion's completed runs' attributes, by run seed."""
    out = defaultdict(list)
    for t in companion.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        out[t.user_attrs["seed"]].append(t.user_attrs)
    return dict(out)


def expected(config, seed: int) -> tuple[str, str]:
    """(split fingerprint, teacher key) of data seed `seed`, computed from the task itself, not from any trial."""
    task = load_task(config.task, seed)
    return task.fingerprint, cache_key("teacher", config.model.arch, config.model.width, task, config.model,
                                       config.pipeline, seed)


def test_resampled_seeds_have_their_own_split_and_teacher_shared_by_every_configuration(tmp_path, teacher_cache_dir,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, url = f"rs-{uuid.uuid4().hex[:8]}", f"sqlite:///{tmp_path / 's.db'}"
    sets = [*TINY, f"pipeline.cache_dir={teacher_cache_dir}"]
    run = cli("study", "run", name, "--config", QUICKSTART, "--storage", url, "--n-trials", 1, "--quiet",
              *[a for s in sets for a in ("--set", s)])
    assert run.exit_code == 0, run.output
    study, config = load_study(name, url)
    assert config.study.confirm.resample == "splits"  # the default
    study_split, study_teacher = expected(config, config.pipeline.seed)
    assert study.trials[0].user_attrs["data_fingerprint"] == study_split
    assert study.trials[0].user_attrs["teacher_key"] == study_teacher

    # splits: seed s splits the data with s and trains its teacher on that split's source.
    companion = optuna.load_study(study_name=confirm_name(name), storage=url)
    assert companion.user_attrs["confirm_resample"] == "splits"
    by_seed = runs_by_seed(companion)
    assert sorted(by_seed) == [1, 2] and all(len(runs) == 4 for runs in by_seed.values())  # top-1 + 3 baselines
    for seed, runs in by_seed.items():
        split, teacher = expected(config, seed)
        assert {r["data_seed"] for r in runs} == {seed}
        assert {r["data_fingerprint"] for r in runs} == {split} != {study_split}  # one split per seed, not the study's
        assert {r["teacher_key"] for r in runs} == {teacher} != {study_teacher}  # one teacher per seed
    assert expected(config, 1) != expected(config, 2)
    # A resampled run replays exactly: its run seed and its data seed are both stored.
    replay = json.loads(cli("trial", "replay", confirm_name(name), 5, "--storage", url, "--json").output)
    assert replay["value"] == replay["stored_value"] and replay["data_seed"] == companion.trials[5].user_attrs["seed"]

    # none: every seed keeps the study's split and teacher.
    assert cli("study", "delete", confirm_name(name), "--storage", url, "--yes").exit_code == 0
    none = config.with_changes("study", confirm=dataclasses.replace(config.study.confirm, resample="none"))
    companion, total = prepare(study, none, url, 1, 2)
    run_worker(confirm_name(name), url, n_trials=total)
    assert companion.user_attrs["confirm_resample"] == "none"
    by_seed = runs_by_seed(optuna.load_study(study_name=confirm_name(name), storage=url))
    assert sorted(by_seed) == [1, 2] and all(len(runs) == 4 for runs in by_seed.values())
    runs = [r for rs in by_seed.values() for r in rs]
    assert {r["data_seed"] for r in runs} == {config.pipeline.seed}
    assert {r["data_fingerprint"] for r in runs} == {study_split}
    assert {r["teacher_key"] for r in runs} == {study_teacher}


def test_a_bad_resample_value_is_one_line_and_exit_2(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = CliRunner().invoke(main, ["study", "create", str(QUICKSTART), "--storage", url,
                                       "--set", "study.confirm.resample=folds"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: study.confirm.resample: 'folds' is not one of splits, none"
    assert not (tmp_path / "s.db").exists()
