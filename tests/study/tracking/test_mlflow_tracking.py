"""MLflow tracking end to end, over HTTP against a real `mlflow server` (SQLite backend, proxied artifacts).

A module-wide server on a free loopback port; tiny studies run through the CLI (`study run`) against it; every
check reads back through `MlflowClient`: the experiment, the study's parent run, one child run per trial with its
params, per-epoch metric histories on the global step axis, final metrics and artifacts, the Optuna state mapped to
the run status (COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED), the teacher and the donor logged once,
weights that load back and reproduce the logged accuracy, the registered `<study>-best` model, `log_weights: none`,
`enabled: false`, and two threads logging at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_server import free_port, mlflow_server

import cli
from models import create_model
from objectives.pipeline import get_task
from objectives.train import accuracy
from study.config.config import config_from_dict
from study.workers.studies import load_study

REPO = Path(__file__).resolve().parents[3]
# A worker thread that dies (e.g. an Optuna error on tell) fails the test instead of printing a warning.
pytestmark = [pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"), pytest.mark.slow]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
CHOICES = ("temperature", "alpha", "beta", "threshold", "lr", "source_weight", "generations", "slim_width",
           "augment")
# Small, seconds-long trials; the same teacher settings everywhere, so the teacher is trained once and cached.
TINY = ["--set", "pipeline.device=cpu", "--set", "pipeline.teacher_epochs=2", "--set", "pipeline.finetune_epochs=2",
        "--set", "pipeline.distill_epochs=3", "--set", "pipeline.retrain_epochs=1", "--set", "study.confirm.top=0"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template):
    """`mlflow server` on a free loopback port, SQLite backend, artifacts proxied to a local folder. Yields
    (tracking URL, working folder); the whole process group is killed at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root, template=mlflow_template) as (url, _):
        yield url, root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder for the studies (checkpoints etc. land here), made the cwd for the module."""
    path = tmp_path_factory.mktemp("mlflow-studies")
    old = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(old)


def _cli(args: list[str]) -> str:
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, f"{args}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output, result.output
    return result.output


class Study:
    """One finished study and handles to read it back."""

    def __init__(self, name: str, url: str, storage: str, output: str):
        from mlflow import MlflowClient

        self.name, self.url, self.storage, self.output = name, url, storage, output
        self.client = MlflowClient(url)
        self.study, self.config = load_study(name, storage)
        self.trials = [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("skipped")]
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else None

    def runs(self, role: str | None = None):
        assert self.experiment_id is not None, f"no experiment '{self.name}'"
        where = f"tags.`distillstudy.role` = '{role}'" if role else ""
        return self.client.search_runs([self.experiment_id], where, max_results=1000)

    def trial_runs(self) -> dict[int, object]:
        runs = self.runs("trial")
        numbers = [int(r.data.tags["optuna.trial_number"]) for r in runs]
        assert len(set(numbers)) == len(numbers), f"a trial number with several runs: {sorted(numbers)}"
        return dict(zip(numbers, runs))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        # MLflow lists a run's logged models (the registered best) through the process-wide tracking URI, not the
        # client's: point it at the server for the listing.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.url)
        try:
            return self._artifacts(run_id, path)
        finally:
            mlflow.set_tracking_uri(previous)

    def _artifacts(self, run_id: str, path: str | None) -> set[str]:
        out = set()
        for f in self.client.list_artifacts(run_id, path):
            out |= self._artifacts(run_id, f.path) if f.is_dir else {f.path}
        return out


def _common(url: str, tmp: Path, name: str) -> list[str]:
    return ["--storage", f"sqlite:///{tmp}/{name}.db", "--set", f"tracking.mlflow_uri={url}",
            "--set", f"pipeline.cache_dir={tmp}/cache"]


@pytest.fixture(scope="module")
def main_study(server, workdir):
    """6 trials (3 baselines + 3 TPE) with an eager median pruner, weights logged for every trial."""
    url, _ = server
    out = _cli(["study", "run", "mlt", "--config", QUICKSTART, "--n-trials", "6", *_common(url, workdir, "mlt"),
                *TINY, "--set", "study.pruner={name: median, kwargs: {n_startup_trials: 1, n_warmup_steps: 1}}"])
    return Study("mlt", url, f"sqlite:///{workdir}/mlt.db", out)


@pytest.fixture(scope="module")
def edge_study(server, workdir):
    """One FAIL trial (a donor whose layer groups do not fit: UserError at preflight) and one PRUNED trial (a
    threshold pruner no student reaches, checked from step 2 on), enqueued so both are certain."""
    url, _ = server
    common = [*_common(url, workdir, "edge"), *TINY, "--set", "model.donor_arch=lenet5",
              "--set", "pipeline.replace_with=donor", "--set", "study.baselines=false",
              "--set", "study.pruner={name: threshold, kwargs: {lower: 0.99, n_warmup_steps: 2}}"]
    _cli(["study", "create", QUICKSTART, "--name", "mlt-edge", *common])
    storage = f"sqlite:///{workdir}/edge.db"
    study = optuna.load_study(study_name="mlt-edge", storage=storage)
    groups = ("stem", "block1", "block2", "head")
    study.enqueue_trial({**{f"layers.{g}": "finetune" for g in groups}, "layers.block1": "replace"})
    study.enqueue_trial({f"layers.{g}": "finetune" for g in groups})
    out = _cli(["study", "run", "mlt-edge", "--storage", storage, "--n-trials", "1"])
    return Study("mlt-edge", url, storage, out)


@pytest.fixture(scope="module")
def parallel_study(server, workdir):
    """4 trials on 2 threads of one worker, no pruning, `log_weights: none`."""
    url, _ = server
    out = _cli(["study", "run", "mlt-par", "--config", QUICKSTART, "--n-trials", "4", "--n-jobs", "2",
                *_common(url, workdir, "par"), *TINY, "--set", "pipeline.distill_epochs=1",
                "--set", "study.pruner.name=none", "--set", "study.pruner.kwargs={}",
                "--set", "tracking.log_weights=none"])
    return Study("mlt-par", url, f"sqlite:///{workdir}/par.db", out)


# ---- the main study ----------------------------------------------------------------------------------------------
def test_experiment_and_parent_run(main_study, tmp_path):
    s = main_study
    assert s.experiment_id is not None
    parents = s.runs("study")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.experiment_id == s.experiment_id
    assert parent.data.tags["optuna.study"] == "mlt"
    assert s.study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert s.study.user_attrs["mlflow_experiment_id"] == s.experiment_id
    params = parent.data.params
    assert params["study.name"] == "mlt"
    assert params["task.name"] == "digits-invert"
    assert params["model.arch"] == "digitnet"
    assert params["pipeline.distill_epochs"] == "3"
    assert params["study.pruner.name"] == "median"
    assert "config.yaml" in s.artifacts(parent.info.run_id)
    path = s.client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == s.study.user_attrs["config"]
    # Nothing else in the experiment but the parent, the teacher and one run per trial.
    roles = sorted(r.data.tags.get("distillstudy.role") for r in s.runs())
    assert roles == sorted(["study", "teacher"] + ["trial"] * len(s.trial_runs()))


def test_one_child_run_per_trial_with_params_tags_and_status(main_study):
    s = main_study
    parent_id = s.runs("study")[0].info.run_id
    runs = s.trial_runs()
    states = {t.state.name for t in s.trials}
    assert {"COMPLETE", "PRUNED"} <= states, states
    assert len(runs) == len(s.trials) == 6
    code_version = s.runs("study")[0].data.tags["distillstudy.code_version"]
    assert "+" in code_version
    for t in s.trials:
        run = runs[t.number]
        tags, params = run.data.tags, run.data.params
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["optuna.study"] == "mlt"
        assert tags["optuna.trial_number"] == str(t.number) == params["trial_number"]
        assert tags["optuna.state"] == t.state.name
        assert run.info.status == STATUS[t.state.name]
        assert tags["distillstudy.code_version"] == code_version
        assert params["seed"] == params["data_seed"] == "0"
        choices = t.user_attrs["choices"]
        # One name per choice: the Optuna parameter, the stored choice and the MLflow param.
        assert set(t.params) <= set(choices)
        for g in ("stem", "block1", "block2", "head"):
            assert params[f"layers.{g}"] == choices[f"layers.{g}"]
        for k in CHOICES:
            assert params[k] == str(choices[k])
        if t.user_attrs.get("baseline"):
            assert tags["distillstudy.baseline"] == t.user_attrs["baseline"]
        if t.state.name == "COMPLETE":
            assert tags["distillstudy.teacher_key"] == t.user_attrs["teacher_key"]
            assert tags["distillstudy.best_stage"] == t.user_attrs["best_stage"]
        else:  # PRUNED: the curve so far is kept, no final metrics, no weights
            assert tags["distillstudy.pruned"].startswith("pruned at step")
            assert "target_val_acc" not in run.data.metrics
            assert s.history(run.info.run_id, "finetune/target_val_acc")
            assert not s.artifacts(run.info.run_id)


def test_metric_histories_follow_the_reported_curve(main_study):
    """Per-epoch `<stage>/...` metrics on the global step axis: several steps each, the same values the objective
    reported to Optuna (so pruning and the MLflow curves agree)."""
    s = main_study
    runs = s.trial_runs()
    for t in s.trials:
        run_id = runs[t.number].info.run_id
        logged = {}
        for key in runs[t.number].data.metrics:
            stage, _, metric = key.partition("/")
            if metric == "target_val_acc" and stage not in ("eval", "seconds", "teacher"):
                for step, value in s.history(run_id, key):
                    assert step not in logged, f"trial {t.number}: two stages at step {step}"
                    logged[step] = value
        assert logged == t.intermediate_values, t.number
        if t.state.name == "COMPLETE":
            # The teacher's point (step 0) is on the curves for reference, but never reported to the pruner.
            teacher = t.user_attrs["stages"]["teacher"]["target_val_acc"]
            assert s.history(run_id, "teacher/target_val_acc") == [(0, teacher)] and 0 not in t.intermediate_values
        if t.state.name == "COMPLETE" and t.user_attrs["choices"]["recipe"] == "distill":
            p = s.config.pipeline
            steps = [st for st, _ in s.history(run_id, "finetune/target_val_acc")]
            assert steps == list(range(1, 1 + p.finetune_epochs))
            assert len(s.history(run_id, "finetune/loss")) == p.finetune_epochs
            kd = s.history(run_id, "distill/kd_loss")
            assert len(kd) >= 2 and [st for st, _ in kd] == [st for st, _ in s.history(run_id, "distill/loss")]
            assert kd[0][0] == p.finetune_epochs + 1  # the global axis continues across stages


def test_final_metrics_and_artifacts_of_complete_trials(main_study, tmp_path):
    s = main_study
    runs = s.trial_runs()
    complete = [t for t in s.trials if t.state.name == "COMPLETE"]
    assert complete
    for t in complete:
        run = runs[t.number]
        m, rid = run.data.metrics, run.info.run_id
        for stage, acc in t.user_attrs["stages"].items():
            for k in ("source_val_acc", "source_test_acc", "target_val_acc", "target_test_acc"):
                assert m[f"eval/{stage}/{k}"] == acc[k]
        assert m["target_val_acc"] == t.value
        assert m["student_params"] == t.user_attrs["student_params"]
        assert m["trainable_params"] == t.user_attrs["trainable_params"]
        assert {"model/state_dict.pt", "layer_map.json", "config.yaml"} <= s.artifacts(rid)
        layer_map = json.loads(Path(s.client.download_artifacts(rid, "layer_map.json", str(tmp_path))).read_text())
        assert layer_map["best_stage"] == t.user_attrs["best_stage"]
        assert layer_map["groups"] == t.user_attrs["layer_map"]
        trial_config = yaml.safe_load(Path(s.client.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text())
        assert trial_config["search"]["layers"] == {g: t.user_attrs["choices"][f"layers.{g}"]
                                                    for g in ("stem", "block1", "block2", "head")}
        pinned = config_from_dict(trial_config).search  # the logged config runs as it is, every choice pinned
        assert pinned.is_empty() and pinned.defaults().flat() == t.user_attrs["choices"]


def test_teacher_logged_once(main_study):
    s = main_study
    teachers = s.runs("teacher")
    assert len(teachers) == 1
    teacher = teachers[0]
    assert teacher.info.status == "FINISHED"
    assert teacher.data.tags["mlflow.parentRunId"] == s.runs("study")[0].info.run_id
    assert "model/state_dict.pt" in s.artifacts(teacher.info.run_id)
    keys = {r.data.tags["distillstudy.teacher_key"] for r in s.trial_runs().values()
            if r.data.tags["optuna.state"] == "COMPLETE"}
    assert keys == {teacher.data.tags["distillstudy.teacher_key"]}


def test_best_weights_load_back_and_reproduce_the_logged_accuracy(main_study, tmp_path):
    s = main_study
    best = s.study.best_trial
    run_id = best.user_attrs["mlflow_run_id"]
    run = s.client.get_run(run_id)
    stage = run.data.tags["distillstudy.best_stage"]
    weights = s.client.download_artifacts(run_id, "model/state_dict.pt", str(tmp_path))
    layer_map = json.loads(Path(s.client.download_artifacts(run_id, "layer_map.json", str(tmp_path))).read_text())
    model = create_model(layer_map["arch"], layer_map["num_classes"], layer_map["in_channels"],
                         group_widths=layer_map["group_widths"])
    model.load_state_dict(torch.load(weights, weights_only=True))
    task = get_task(s.config.task, s.config.pipeline.seed, torch.device("cpu"))
    acc = accuracy(model, task.target_val, s.config.pipeline.eval_batch_size)
    assert acc == run.data.metrics[f"eval/{stage}/target_val_acc"] == best.value


def test_best_model_registered(main_study):
    s = main_study
    best_run = s.study.best_trial.user_attrs["mlflow_run_id"]
    assert s.client.get_registered_model("mlt-best").name == "mlt-best"
    versions = s.client.search_model_versions("name='mlt-best'")
    assert versions
    latest = max(versions, key=lambda v: int(v.version))
    assert latest.run_id == best_run
    # An MLflow PyTorch model logged from the best trial's run, loadable with mlflow.pytorch.load_model
    # (tests/study/tracking/test_mlflow_model.py loads one); its weights stay under the run's model/ too.
    assert latest.source.startswith("models:/m-")
    assert s.client.get_logged_model(latest.source.removeprefix("models:/")).source_run_id == best_run
    # Every version was the best trial when it was registered: their runs' accuracies only go up.
    runs = {v.run_id: s.client.get_run(v.run_id).data.metrics["target_val_acc"] for v in versions}
    ordered = [runs[v.run_id] for v in sorted(versions, key=lambda v: int(v.version))]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)


# ---- FAIL and PRUNED, made certain -------------------------------------------------------------------------------
def test_failed_and_pruned_runs(edge_study):
    s = edge_study
    by_state = {t.state.name: t for t in s.trials}
    assert set(by_state) == {"FAIL", "PRUNED"}, [(t.number, t.state.name) for t in s.trials]
    runs = s.trial_runs()
    assert len(runs) == 2

    failed, pruned = by_state["FAIL"], by_state["PRUNED"]
    run = runs[failed.number]
    assert failed.user_attrs["mlflow_run_id"] == run.info.run_id
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.state"] == "FAIL"
    assert run.data.tags["distillstudy.failure"] == failed.user_attrs["failure"]
    assert run.data.tags["distillstudy.failure"].startswith("invalid input:")
    assert run.data.params["layers.block1"] == "replace"
    assert not run.data.metrics and not s.artifacts(run.info.run_id)

    run = runs[pruned.number]
    assert pruned.user_attrs["mlflow_run_id"] == run.info.run_id
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["distillstudy.pruned"].startswith("pruned at step 2")
    assert [st for st, _ in s.history(run.info.run_id, "finetune/target_val_acc")] == [1, 2]
    assert [st for st, _ in s.history(run.info.run_id, "finetune/loss")] == [1, 2]
    assert "target_val_acc" not in run.data.metrics and not s.artifacts(run.info.run_id)
    # No trial finished, so nothing is registered.
    assert not s.client.search_registered_models("name='mlt-edge-best'")


# ---- two threads, log_weights: none ------------------------------------------------------------------------------
def test_two_threads_log_concurrently_without_cross_talk(parallel_study):
    s = parallel_study
    assert "Exception" not in s.output and "Error" not in s.output, s.output
    runs = s.trial_runs()
    assert len(runs) == len(s.trials) == 4
    assert all(t.state.name == "COMPLETE" for t in s.trials), [(t.number, t.state.name, t.user_attrs.get("failure"))
                                                                for t in s.trials]
    for t in s.trials:
        run = runs[t.number]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.params["trial_number"] == run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["target_val_acc"] == t.value
        curve = {}
        for stage in t.user_attrs["stages"]:
            if stage != "teacher":
                curve.update(s.history(run.info.run_id, f"{stage}/target_val_acc"))
        assert curve == {k: v for k, v in t.intermediate_values.items() if k > 0}
    spans = [(r.info.start_time, r.info.end_time) for r in runs.values()]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), \
        "no two trials ran at the same time"
    assert len(s.runs("teacher")) == 1


def test_log_weights_none_logs_no_weights(parallel_study):
    s = parallel_study
    for run in s.runs():
        assert not any(p.startswith("model/") for p in s.artifacts(run.info.run_id)), run.info.run_name
    for run in s.trial_runs().values():
        assert {"layer_map.json", "config.yaml"} <= s.artifacts(run.info.run_id)
    assert not s.client.search_registered_models("name='mlt-par-best'")


# ---- tracking disabled -------------------------------------------------------------------------------------------
def test_tracking_disabled_creates_no_runs(server, workdir):
    from mlflow import MlflowClient

    url, _ = server
    client = MlflowClient(url)
    before = {e.experiment_id for e in client.search_experiments()}
    _cli(["study", "run", "mlt-off", "--config", QUICKSTART, "--n-trials", "1", *_common(url, workdir, "off"), *TINY,
          "--set", "pipeline.finetune_epochs=1", "--set", "pipeline.distill_epochs=1",
          "--set", "tracking.enabled=false"])
    assert client.get_experiment_by_name("mlt-off") is None
    assert {e.experiment_id for e in client.search_experiments()} == before
    assert not client.search_runs(list(before), "tags.`optuna.study` = 'mlt-off'")
    study, _ = load_study("mlt-off", f"sqlite:///{workdir}/off.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and not any("mlflow_run_id" in t.user_attrs for t in study.trials)
    assert "mlflow_parent_run_id" not in study.user_attrs


def test_donor_logged_once_and_linked_from_the_trial(server, workdir):
    """With `replace_with: donor`, a completed trial that replaces a group links the donor's own run."""
    url, _ = server
    common = [*_common(url, workdir, "donor"), *TINY, "--set", "pipeline.replace_with=donor",
              "--set", "study.baselines=false", "--set", "study.pruner.name=none", "--set", "study.pruner.kwargs={}"]
    _cli(["study", "create", QUICKSTART, "--name", "mlt-donor", *common])
    storage = f"sqlite:///{workdir}/donor.db"
    optuna.load_study(study_name="mlt-donor", storage=storage).enqueue_trial(
        {"layers.stem": "finetune", "layers.block1": "finetune", "layers.block2": "replace", "layers.head": "finetune"})
    _cli(["study", "run", "mlt-donor", "--storage", storage, "--n-trials", "1", "--quiet"])
    s = Study("mlt-donor", url, storage, "")
    donors = s.runs("donor")
    assert len(donors) == 1 and donors[0].info.status == "FINISHED"
    assert "cache_path" in donors[0].data.params and "source_val_acc" in donors[0].data.metrics
    (run,) = s.trial_runs().values()
    assert run.data.tags["distillstudy.donor_key"] == donors[0].data.tags["distillstudy.teacher_key"]
    assert run.data.tags["distillstudy.donor_run_id"] == donors[0].info.run_id


def test_unreachable_tracking_server_is_a_one_line_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(cli.main, ["study", "run", "down", "--config", QUICKSTART, "--quiet",
                                           *_common(url, tmp_path, "down"), *TINY])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: cannot reach the MLflow tracking server") and \
        result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/down.db") == []  # no study, no baselines left behind
