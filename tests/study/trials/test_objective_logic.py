"""The objective's bookkeeping around a trial, with a stand-in for the training (`make_objective`'s `run`): a
scripted learning curve, or a raised error, in milliseconds. Real Optuna throughout (a SQLite storage in a temporary
folder, the study's own pruner and queue); the training these stand-ins replace is tested on real data elsewhere
(test_pipeline, test_study_cli, test_teacher_cache).

- Baselines are never pruned, even by a pruner that stops a non-baseline with the same curve at once.
- The pruner is asked only at decision points (with a long stage warm-up: only at stage ends).
- An enqueued trial failed by its worker is queued again, at most `study.max_retry` times; an invalid input or a
  sampled trial is not.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from models.errors import UserError
from objectives.pipeline import StageResult, TrialResult
from objectives.stages import plan_stages
from objectives.teacher import TeacherInfo
from study.config.config import load_config
from study.trials.objective import make_objective
from study.trials.record import TrialRecord
from study.workers.studies import create_study, load_study

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"
S = optuna.trial.TrialState
# Stages of 3 epochs (finetune 1-3, distill 4-6): enough steps for warm-ups and decision points to differ.
SETS = ["tracking.enabled=false", "pipeline.device=cpu", "pipeline.finetune_epochs=3", "pipeline.distill_epochs=3",
        "pipeline.retrain_epochs=1", "search.generations=0", "study.confirm.top=0"]


def fake_run(curve):
    """A stand-in for `run_trial`: reports `curve(choices)` (one value per step of the recipe's stages, as the
    pipeline reports its target val acc) and returns a result delivering the last value; `curve` may raise."""

    def run(task, model, pipeline, choices, report, on_epoch, checkpoints, run_seed, data_seed):
        stages = plan_stages(pipeline, choices)
        values = curve(choices)
        for stage in stages:
            for step in range(stage.first_step, stage.last_step + 1):
                report(step, values[step - 1], stage.name)
        last = stages[-1]
        acc = values[last.last_step - 1]
        teacher = TeacherInfo(role="teacher", key="k", cache="hit", path="", epochs=1, seconds=0.0,
                              source_val_acc=0.9, target_val_acc=0.1)
        return TrialResult(value=acc, best_stage=last.name, select="last", recipe=choices.recipe,
                           stages={last.name: StageResult(0.9, 0.9, acc, acc, epochs=last.epochs, seconds=0.0,
                                                          first_step=last.first_step)},
                           params=choices.flat(), layer_map={}, student_params=1000, teacher_params=1000,
                           teacher=teacher, donor=None, epochs_to_threshold=None, total_epochs=last.last_step,
                           budget=last.last_step, seconds=0.0, device="cpu", run_seed=run_seed,
                           model_hash=f"h{acc}", student=None)

    return run


def study_with(tmp_path, *overrides):
    """A study created from the quickstart with `overrides`, loaded as a worker loads it (its sampler and pruner)."""
    # recipe pinned to distill: every trial has the same stages, so the scripted curves fit each one.
    config = load_config(QUICKSTART, [*SETS, "search.recipe=distill", f"study.checkpoint_dir={tmp_path / 'ck'}",
                                      *overrides])
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_study(config, "logic", url)
    return load_study("logic", url, with_heartbeat=True)


def run_trials(study, config, run, n: int) -> list[optuna.trial.FrozenTrial]:
    objective = make_objective(config, study, n_trials=100, run=run)
    study.optimize(objective, n_trials=n, catch=(Exception,))
    return study.get_trials()


def test_baselines_are_never_pruned_by_a_pruner_that_stops_the_same_curve_at_once(tmp_path):
    study, config = study_with(tmp_path, "study.pruner.name=median", "study.pruner.patience=-1",
                               "study.pruner.stage_warmup=0",
                               "study.pruner.kwargs={n_startup_trials: 0, n_warmup_steps: 0}")
    good, bad = [0.5 + 0.05 * s for s in range(6)], [0.1] * 6  # head-only's linear probe: far below the others

    def curve(choices):
        return bad if set(choices.layers.values()) == {"freeze", "finetune"} else good

    trials = run_trials(study, config, fake_run(curve), 3)  # the three enqueued baselines
    baselines = {TrialRecord(t).baseline: t for t in trials}
    assert {b: t.state for b, t in baselines.items()} == dict.fromkeys(baselines, S.COMPLETE)
    assert baselines["head-only"].value == 0.1
    assert all(len(t.intermediate_values) == 6 for t in baselines.values())  # every epoch reported, none cut

    # The same curve in a sampled trial is stopped at its first decision point.
    sampled = run_trials(study, config, fake_run(lambda choices: bad), 1)[-1]
    assert sampled.state == S.PRUNED and max(sampled.intermediate_values) == 1
    assert sampled.user_attrs["pruned_at"].startswith("pruned at step 1 ")


def test_trials_are_pruned_only_at_stage_ends_with_a_long_warmup(tmp_path):
    study, config = study_with(tmp_path, "study.baselines=false",
                               "study.pruner={name: percentile, kwargs: {percentile: 90, n_startup_trials: 1, "
                               "n_warmup_steps: 0}, stage_warmup: 1000}")
    best = [0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    run_trials(study, config, fake_run(lambda choices: best), 1)
    worse = [v - 0.3 for v in best]  # below the 90th percentile at every step
    trials = run_trials(study, config, fake_run(lambda choices: worse), 3)
    pruned = [t for t in trials if t.state == S.PRUNED]
    assert len(pruned) == 3 and {max(t.intermediate_values) for t in pruned} == {3}  # the finetune stage's end


def test_pruned_at_the_first_decision_point_after_the_stage_warmup(tmp_path):
    study, config = study_with(tmp_path, "study.baselines=false", "study.pruner.patience=-1",
                               "study.pruner={name: percentile, kwargs: {percentile: 90, n_startup_trials: 1, "
                               "n_warmup_steps: 0}, stage_warmup: 2}")
    run_trials(study, config, fake_run(lambda choices: [0.9] * 6), 1)
    (pruned,) = [t for t in run_trials(study, config, fake_run(lambda choices: [0.1] * 6), 1) if t.number == 1]
    assert pruned.state == S.PRUNED and max(pruned.intermediate_values) == 3  # not at step 1 or 2: warming up


def _fails(exc: BaseException):
    def curve(choices):
        raise exc

    return fake_run(curve)


def test_an_enqueued_trial_failed_by_its_worker_is_queued_again_at_most_max_retry_times(tmp_path):
    study, config = study_with(tmp_path, "study.max_retry=1")
    trials = run_trials(study, config, _fails(OSError("disk on fire")), 6)
    failed = [t for t in trials if t.state == S.FAIL]
    baselines = {TrialRecord(t).baseline for t in failed}
    assert baselines == {"finetune-all", "head-only", "finetune-all-kd"}
    # Each baseline: the original (queued again) and one copy (not queued again: max_retry 1).
    for name in baselines:
        copies = [t for t in failed if TrialRecord(t).baseline == name]
        assert [t.user_attrs.get("requeues", 0) for t in copies] == [0, 1], name
        assert copies[0].user_attrs["failure"] == "OSError: disk on fire; queued again"
        assert copies[1].user_attrs["failure"] == "OSError: disk on fire"
    assert not [t for t in study.get_trials() if t.state == S.WAITING]


@pytest.mark.parametrize("exc,reason", [(UserError("no data"), "invalid input: no data"),
                                        (OSError("disk on fire"), "OSError: disk on fire")])
def test_a_sampled_trial_or_an_invalid_input_is_not_queued_again(tmp_path, exc, reason):
    study, config = study_with(tmp_path, "study.baselines=false")
    (failed,) = run_trials(study, config, _fails(exc), 1)
    assert failed.state == S.FAIL and failed.user_attrs["failure"] == reason
    assert not [t for t in study.get_trials() if t.state == S.WAITING]


def test_a_signal_while_a_finished_trial_is_recorded_is_an_interrupted_trial_queued_again(tmp_path):
    """SIGTERM raises KeyboardInterrupt wherever the worker is; landing after training, while the result is written,
    it once left a FAIL trial with no reason and nothing queued again."""
    from study.tracking import NullTracker

    class SignalWhileRecording(NullTracker):
        def log_teacher(self, *args, **kwargs):
            raise KeyboardInterrupt

    study, config = study_with(tmp_path, "study.baselines=false")
    objective = make_objective(config, study, n_trials=100, tracker=SignalWhileRecording(),
                               run=fake_run(lambda choices: [0.5] * 6))
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    (stopped, queued) = study.get_trials()
    assert stopped.state == S.FAIL and stopped.user_attrs["failure"] == "interrupted (worker stopped); retried"
    assert queued.state == S.WAITING and queued.user_attrs["retry_of"] == stopped.number
