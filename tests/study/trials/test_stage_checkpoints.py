"""A stage checkpoint belongs to one study: keyed by the study's storage and id, its task, config, the code version,
the trial's choices and seeds; resumed only by that computation; deleted with the study; kept under the cache
folder, never in the working directory. Real SQLite storages, real training on tiny data."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from cli import main
from objectives.checkpoints import StageCheckpoints
from objectives.pipeline import run_trial
from objectives.settings import TrialChoices
from study.tracking import NullTracker
from study.trials.objective import make_objective
from study.trials.stage_checkpoints import study_folder
from study.workers.studies import load_study

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
# Trials of about a second: 1 epoch per stage, no born-again rounds, the distill recipe (finetune, then distill: a
# checkpoint after finetune), one searched choice so the study has something to sample.
TINY = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1",
        "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1",
        "search.generations=0", "search.recipe=distill", "search.layers.actions=finetune", "search.lr=[0.003, 0.001]",
        "study.baselines=false", "study.pruner.name=none", "study.pruner.kwargs={}", "study.confirm.top=0",
        "tracking.enabled=false"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def create(name: str, url: str, cache: str, task: str) -> None:
    sets = [*TINY, f"task.name={task}", f"pipeline.cache_dir={cache}"]
    sets = [a for s in sets for a in ("--set", s)]
    result = cli("study", "create", QUICKSTART, "--name", name, "--storage", url, *sets)
    assert result.exit_code == 0, result.output


class _StopAtDistill(NullTracker):
    """Tracking off, and the worker's stop flag raised at the distill stage's first epoch: the trial is interrupted
    with its finetune stage checkpointed, as a Ctrl-C there leaves it."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def log_epoch(self, run_id, stage: str, step: int, metrics: dict) -> None:
        if stage == "distill":
            self.flag.set()


def interrupt_first_trial(name: str, url: str) -> optuna.trial.FrozenTrial:
    """Run trial 0 of study `name` through the study's objective until it is interrupted after its first stage."""
    study, config = load_study(name, url, with_heartbeat=True)  # the study's seeded sampler: trial 0 draws alike
    flag = threading.Event()
    objective = make_objective(config.with_changes("study", storage=url), study, 1, _StopAtDistill(flag), flag)
    trial = study.ask()
    with pytest.raises(KeyboardInterrupt):
        objective(trial)
    study.tell(trial, state=TrialState.FAIL)
    return study.trials[trial.number]


def test_a_new_study_named_like_a_deleted_one_on_another_task_trains_afresh(tmp_path, teacher_cache_dir,
                                                                           monkeypatch):
    """Study X on digits-invert leaves a finetune checkpoint and is deleted behind distillstudy's back (Optuna's own
    delete: the checkpoint stays); a new study X on digits-permute, with the same study id (SQLite reuses it),
    choices and seed, must not resume it: its trial equals a fresh run of its choices on its own task."""
    monkeypatch.chdir(tmp_path)
    name, url = f"ck-{uuid.uuid4().hex[:8]}", f"sqlite:///{tmp_path / 's.db'}"
    create(name, url, teacher_cache_dir, "digits-invert")
    old = interrupt_first_trial(name, url)
    old_study, old_config = load_study(name, url)
    folder = study_folder(old_config.to_dict(), old_study, url)
    assert folder.parent == Path(teacher_cache_dir) / "checkpoints"  # under the cache folder
    assert [p.name for p in folder.glob("*/state.pt")] == ["state.pt"], "the finetune stage was checkpointed"
    assert not (tmp_path / ".distillstudy").exists(), "nothing in the working directory"
    optuna.delete_study(study_name=name, storage=url)

    create(name, url, teacher_cache_dir, "digits-permute")
    new_study, new_config = load_study(name, url)
    # Same storage, same id: only the key tells them apart.
    assert study_folder(new_config.to_dict(), new_study, url) == folder
    run = cli("study", "run", name, "--storage", url, "--n-trials", 1, "--quiet")
    assert run.exit_code == 0, run.output
    trial = optuna.load_study(study_name=name, storage=url).trials[0]
    assert trial.state == TrialState.COMPLETE and trial.params == old.params
    fresh = run_trial(new_config.task, new_config.model, new_config.pipeline,
                      TrialChoices.from_flat(trial.user_attrs["choices"]))
    # Trained afresh: the same weights as a fresh run (resuming the old study's finetune stage, trained on the other
    # task, delivers other weights; the case: value 0.0073 instead of 0.1679).
    assert trial.user_attrs["model_hash"] == fresh.model_hash
    assert trial.value == fresh.value and trial.intermediate_values[1] == fresh.stages["finetune"].target_val_acc


def test_study_delete_removes_its_checkpoints_and_its_confirmation_study(tmp_path, teacher_cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, url = f"ck-{uuid.uuid4().hex[:8]}", f"sqlite:///{tmp_path / 's.db'}"
    create(name, url, teacher_cache_dir, "digits-invert")
    interrupt_first_trial(name, url)
    study, config = load_study(name, url)
    folder = study_folder(config.to_dict(), study, url)
    assert list(folder.glob("*/state.pt"))
    # A confirmation study belongs to its study (a stand-in: the companion's attributes, no runs).
    companion = optuna.create_study(study_name=f"{name}-confirm", storage=url)
    companion.set_user_attr("config", study.user_attrs["config"])
    companion.set_user_attr("confirm_of", name)
    (study_folder(config.to_dict(), companion, url) / "k").mkdir(parents=True)
    companion_folder = study_folder(config.to_dict(), companion, url)

    result = cli("study", "delete", name, "--storage", url, "--yes")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"deleted study '{name}' and its confirmation study '{name}-confirm', and their "
                                     f"stage checkpoints")
    assert not folder.exists() and not companion_folder.exists()
    assert optuna.get_all_study_summaries(url) == []


def test_a_checkpoint_of_another_computation_is_never_resumed(tmp_path):
    """The identity saved with a checkpoint must match the reader's, even in the same directory."""
    state = {"val": {"finetune": 0.5}, "models": {}, "runs": {}}
    StageCheckpoints(tmp_path / "c", identity='{"task": "digits-invert"}').save(state)
    assert StageCheckpoints(tmp_path / "c", identity='{"task": "digits-invert"}').load() == state
    assert StageCheckpoints(tmp_path / "c", identity='{"task": "digits-permute"}').load() is None
    assert StageCheckpoints(tmp_path / "c").load() is None
