"""MLflow tracking: one experiment per study, a parent run per study, a nested child run per trial opened when the
trial starts (so running trials show live), per-epoch curves in one batch per epoch, final metrics, weights, the
layer map, and the best model registered as `<study>-best` (under the one rule of `registry.py`; a confirmation's
runs on the registration seed log their model, and `answer.py` registers the verdict's).

Every call names its run id explicitly through `MlflowClient`: threads and processes log concurrently without the
fluent API's global active-run stack (and without a lock around logging). Only opening a trial's run happens on the
trial's thread (the trial needs the run id); everything else is handed to a `BackgroundWriter`, so a trial never
waits for the tracking store, and `end_study` waits for whatever is still queued.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import threading
import time

import optuna
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from models.errors import UserError, first_line
from objectives.settings import TrialChoices
from objectives.version import code_version
from study.config.config import Config
from study.confirm.confirmation import describe
from study.tracking import store, tracking_uri
from study.tracking.access import check_server
from study.tracking.mlflow_model import cpu_copy, log_pytorch_model
from study.tracking.view import SHARED_VIEW_TAG, shared_view
from study.tracking.writer import BackgroundWriter
from study.trials.record import TrialRecord
from study.workers.storage import mask_url

# Optuna state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "KILLED": "KILLED"}
_PARAM_MAX = 6000  # MLflow's limit on a param value's length


def flatten(data: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def trial_params(choices, seed: int, number: int, data_seed: int | None = None) -> dict:
    """The run's params: every choice under its one name (`layers.<group>`, `alpha`, ...), trial number, run seed
    and data seed (the seed of its data split and teacher)."""
    return {**choices.flat(), "trial_number": number, "seed": seed,
            "data_seed": seed if data_seed is None else data_seed}


def run_name(number: int, rec: TrialRecord) -> str:
    """A trial run's name in the UI: `trial N` for the search; for a confirmation run (its trials are numbered
    from 0 in its own study, beside the search's), `confirm <configuration> seed <s>`."""
    if not rec.confirm_role:
        return f"trial {number}"
    if rec.baseline:
        return f"confirm {rec.baseline} seed {rec.seed}"
    choices = rec.confirm_choices
    return f"confirm {rec.confirm_role} ({describe(choices.flat())}) seed {rec.seed}"


def cpu_state(model) -> dict:
    """The model's state_dict on the host (a copy on CUDA; the same tensors on CPU, where nothing changes them)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class MlflowTracker:
    """Records a study's trials in MLflow (see the module docstring).

    When the tracking store becomes unavailable (a dead or hung server, an artifact folder or a disk that cannot be
    written), the tracker says so in one warning, closes the runs it has open as FAILED if the store still lets it,
    and drops every later call: the study goes on untracked, its results in the Optuna storage. A new worker
    tracks again."""

    def __init__(self, config: Config):
        store.configure_client()
        self.config = config
        self.uri = tracking_uri(config)
        self.client = None  # made under the store's lock: making it initialises a database store
        self.experiment = config.tracking.experiment or config.study.name
        self.experiment_id = ""
        self.parent_id = ""
        self.study = None
        self.total = config.study.n_trials
        self.offline = False  # set once on the first outage; then every call is dropped
        self.unreachable = False  # the outage was a server that does not answer at all
        self._open_runs: set[str] = set()  # trial and teacher runs not yet closed, closed as FAILED on an outage
        self._teacher_runs: dict[str, str] = {}  # teacher cache key -> its run id ('' while being looked up)
        self._lock = threading.Lock()  # guards only that dict and the outage switch, never logging
        self.writer = BackgroundWriter("mlflow-writer")

    # ---- study --------------------------------------------------------------------------------------------------
    def prepare_study(self, study, config: Config) -> None:
        """`study create`: initialise the tracking store, the experiment and the parent run (SCHEDULED), so
        workers starting together find them. A UserError when the store cannot be used."""
        self._open(study, config, status="SCHEDULED")

    def start_study(self, study, config: Config, total: int | None = None) -> None:
        """Find (or create) the experiment and the study's parent run, shared by every worker, and mark the parent
        RUNNING; `total` is the finished-trial count this worker runs the study to. An unreachable tracking server
        or an unusable store is a UserError before any trial starts (not minutes of retries, not a traceback)."""
        self.total = total or config.study.n_trials
        self._open(study, config, status="RUNNING")

    def _open(self, study, config: Config, status: str) -> None:
        self.study = study
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        try:
            store.locked_with_retry(self.uri, lambda: self._start_study(study, config, status))
        except Exception as exc:  # noqa: BLE001 - an outage (OSError, database) or MLflow's own refusal
            if not (isinstance(exc, MlflowException) or store.is_outage(exc)):
                raise
            raise UserError(f"MLflow tracking at '{mask_url(self.uri)}' failed: {type(exc).__name__}: "
                            f"{mask_url(first_line(exc, 200))} (set tracking.enabled: false to run without it)"
                            ) from None

    def _start_study(self, study, config: Config, status: str) -> None:
        # Under the store's lock: workers starting together initialise one database and create one experiment and
        # one parent run.
        self.client = self.client or MlflowClient(tracking_uri=self.uri)
        owner = study.user_attrs.get("confirm_of", study.study_name)  # a confirmation nests in its study's run
        self.experiment_id = store.experiment_id(self.client, self.experiment, owner)
        # The columns a new user lands on (tracking.view); set on every start: the latest study's config wins.
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG, shared_view(config))
        self.parent_id = store.find_parent_run(self.client, self.experiment_id, owner)
        if self.parent_id:
            if status == "RUNNING" and "confirm_of" not in study.user_attrs:  # its study's status stays its own
                self.client.update_run(self.parent_id, status="RUNNING")
            return
        run = self.client.create_run(self.experiment_id, run_name=f"study {owner}",
                                     tags={"distillstudy.role": "study", "optuna.study": owner,
                                           "distillstudy.code_version": code_version(),
                                           # until `study confirm` publishes its verdict (answer.publish)
                                           "distillstudy.answer_state": "unconfirmed"})
        try:
            # config.study.storage is already masked by the worker.
            params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                      for k, v in flatten(config.to_dict()).items()}
            self._log_params(run.info.run_id, params)
            self.client.log_text(run.info.run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
            if status != "RUNNING":
                self.client.update_run(run.info.run_id, status=status)
        except Exception:
            # Half-written (an artifact folder that cannot be written): gone, so the next start makes it again.
            try:
                self.client.delete_run(run.info.run_id)
            except Exception:  # noqa: BLE001 - the store refuses everything: the original error says why
                pass
            raise
        self.parent_id = run.info.run_id
        if owner == study.study_name:
            study.set_user_attr("mlflow_parent_run_id", self.parent_id)
            study.set_user_attr("mlflow_experiment_id", self.experiment_id)

    def end_study(self, study, interrupted: bool = False, storage_lost: str | None = None) -> None:
        """Wait for the queued logging (when `interrupted`, at most `tracking.exit_wait` seconds: the worker is on
        its way out), then set the parent run's status: FINISHED at the study's total, KILLED short of it with no trial
        left running, still RUNNING while other workers run trials. `storage_lost` (the Optuna storage is gone, so
        the trials cannot be counted): this worker's open trial runs are closed as FAILED, the parent as KILLED
        (a worker that runs the study again marks it RUNNING)."""
        wait = self.config.tracking.exit_wait
        if not self.writer.close(timeout=wait if interrupted or storage_lost else None):
            print(f"warning: MLflow writes still queued after {wait} s were dropped (tracking.exit_wait)",
                  file=sys.stderr, flush=True)
            return
        if self.offline and (interrupted or self.unreachable) or not self.parent_id:
            return
        if storage_lost:
            if self._close_open_runs(f"worker stopped: {storage_lost}"):
                try:
                    self.client.set_terminated(self.parent_id, "KILLED")
                except Exception:  # noqa: BLE001 - the tracking store went with it: nothing more to close
                    pass
            return
        if "confirm_of" in study.user_attrs:  # a confirmation shares its study's parent run, and its own totals
            return
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        status = store.study_status(states.count("COMPLETE") + states.count("PRUNED"), self.total,
                                    states.count("RUNNING"))
        if status:
            try:  # also after an outage: a store that only lost its artifact folder still takes it
                self.client.set_terminated(self.parent_id, status)
            except Exception as exc:  # noqa: BLE001 - one warning (none when the outage was reported already)
                self._go_offline(exc)

    # ---- outages ------------------------------------------------------------------------------------------------
    def _submit(self, fn, *args, **kwargs) -> None:
        """Queue `fn(*args, **kwargs)` to the writer, unless the store is known to be down."""
        if not self.offline:
            self.writer.submit(self._guarded, fn, *args, **kwargs)

    def _guarded(self, fn, *args, **kwargs):
        if self.offline:
            return None
        try:
            # A tracking database on a server (PostgreSQL) is waited for through a restart, like the Optuna storage.
            return store.retry_database_outage(self.uri, self.config.study.storage_retry, fn, *args, **kwargs)
        except Exception as exc:
            if not store.is_outage(exc):
                raise  # the writer reports it in one line; tracking goes on
            self._go_offline(exc)
            return None

    def _go_offline(self, exc: BaseException) -> None:
        with self._lock:
            if self.offline:
                return
            self.offline = True
            open_runs, self._open_runs = set(self._open_runs), set()
        print(f"warning: MLflow tracking at '{mask_url(self.uri)}' is unavailable ({type(exc).__name__}: "
              f"{mask_url(first_line(exc, 200))}); this worker goes on without tracking, every result is in the "
              f"Optuna storage", file=sys.stderr, flush=True)
        self.unreachable = store.is_unreachable(exc)
        if self.unreachable:
            return  # closing runs would only wait for the timeouts again, on this (maybe a trial's) thread
        # A store that still answers (an unwritable artifact folder) gets the open runs closed; one refusal ends it.
        self._close_open_runs(f"tracking stopped: {type(exc).__name__}: {first_line(exc, 200)}", open_runs)

    def _close_open_runs(self, reason: str, open_runs=None) -> bool:
        """Close runs still open (default: this worker's trial and teacher runs) as FAILED, saying why; False when
        the store refused (then nothing more is tried)."""
        if open_runs is None:
            with self._lock:
                open_runs, self._open_runs = set(self._open_runs), set()
        for run_id in open_runs:
            try:
                self.client.log_batch(run_id, tags=[RunTag("distillstudy.failure", reason)], synchronous=True)
                self.client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the store is down: nothing more to close
                return False
        return True

    # ---- trials -------------------------------------------------------------------------------------------------
    def start_trial(self, trial, choices) -> str:
        """Open the trial's child run now, so running trials are visible in the UI."""
        tags = {"mlflow.parentRunId": self.parent_id, "optuna.study": self.study.study_name,
                "optuna.trial_number": str(trial.number), "optuna.state": "RUNNING",
                "distillstudy.code_version": code_version(), "distillstudy.role": "trial"}
        rec = TrialRecord(trial)
        if rec.baseline:
            tags["distillstudy.baseline"] = rec.baseline
        if rec.confirm_role:  # a confirmation run: which configuration, of which trial
            tags["distillstudy.confirm"] = rec.confirm_role
            tags["distillstudy.confirm_of_trial"] = str(rec.confirm_of_trial)
        if self.offline:
            return None
        try:
            # On the trial's thread (the trial needs the id), bounded by the HTTP timeouts of store.HTTP_DEFAULTS.
            run = store.retry_database_outage(self.uri, self.config.study.storage_retry, self.client.create_run,
                                              self.experiment_id, run_name=run_name(trial.number, rec), tags=tags)
        except Exception as exc:  # noqa: BLE001 - a tracking outage must not fail the trial: it runs untracked
            if store.is_outage(exc):
                self._go_offline(exc)
            else:
                print(f"warning: trial {trial.number} is not tracked: cannot open its MLflow run "
                      f"({type(exc).__name__}: {first_line(exc, 200)})", file=sys.stderr, flush=True)
            return None
        with self._lock:
            late = self.offline  # tracking stopped while this run was being created: its open runs were closed
            if not late:
                self._open_runs.add(run.info.run_id)
        if late:
            self._close_open_runs("tracking stopped while the run was being created", {run.info.run_id})
            return None
        self._submit(self._log_params, run.info.run_id, trial_params(choices, rec.seed, trial.number, rec.data_seed))
        return run.info.run_id

    def log_epoch(self, run_id, stage: str, step: int, metrics: dict) -> None:
        """One batch per epoch: `<stage>/<metric>` at the global step, written by the background writer."""
        now = int(time.time() * 1000)
        batch = [Metric(f"{stage}/{k}", float(v), now, step) for k, v in metrics.items()]
        if run_id:
            self._submit(self.client.log_batch, run_id, metrics=batch, synchronous=True)

    def log_teacher(self, info, model) -> None:
        """Log each distinct teacher once per study (its own run); trials link to it by tag."""
        with self._lock:
            if info.key in self._teacher_runs:
                return
            self._teacher_runs[info.key] = ""  # claimed: later trials of this worker skip straight past
            state = cpu_state(model) if model is not None and self.config.tracking.log_weights != "none" else None
            # Queued under the lock: no other trial's end can be queued before it (and miss the link tag).
            self._submit(self._log_teacher, info, state)

    def _log_teacher(self, info, state: dict | None) -> None:
        try:
            self._find_or_log_teacher(info, state)
        except Exception:
            # A later trial tries again. No lock here: a trial thread may hold it while it waits for room in the
            # queue this thread drains (a single dict operation is atomic anyway).
            self._teacher_runs.pop(info.key, None)
            raise

    def _find_or_log_teacher(self, info, state: dict | None) -> None:
        # The role too: a finished trial's run carries its teacher's key as well (and would be found first).
        found = self.client.search_runs([self.experiment_id], f"tags.`distillstudy.teacher_key` = '{info.key}' "
                                        f"and tags.`distillstudy.role` = '{info.role}'", max_results=1)
        if found:  # another worker (or an earlier run of this study) logged it
            self._teacher_runs[info.key] = found[0].info.run_id
            return
        run = self.client.create_run(self.experiment_id, run_name=f"{info.role} {info.key[:8]}",
                                     tags={"distillstudy.role": info.role, "distillstudy.teacher_key": info.key,
                                           "mlflow.parentRunId": self.parent_id})
        self._teacher_runs[info.key] = rid = run.info.run_id
        with self._lock:  # open like a trial's run: an outage before it is finished closes it as FAILED
            self._open_runs.add(rid)
        try:
            self._fill_teacher_run(rid, info, state)
        except Exception as exc:
            if not store.is_outage(exc):  # an outage goes on to `_guarded`, which closes every open run
                with self._lock:
                    self._open_runs.discard(rid)
                self._close_open_runs(f"teacher run not logged: {type(exc).__name__}: {first_line(exc, 200)}",
                                      {rid})
            raise
        with self._lock:
            self._open_runs.discard(rid)

    def _fill_teacher_run(self, rid: str, info, state: dict | None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(rid, metrics=[Metric("source_val_acc", info.source_val_acc, now, 0),
                                            Metric("target_val_acc", info.target_val_acc, now, 0),
                                            Metric("seconds", info.seconds, now, 0)],
                              params=[Param("epochs", str(info.epochs)), Param("cache_path", info.path)])
        if state is not None:
            self._log_state_dict(rid, state, "model")
        self.client.set_terminated(rid, "FINISHED")

    def end_trial(self, run_id, trial, state: str, result=None, reason: str | None = None,
                  value: float | None = None) -> None:
        """Final metrics, artifacts, tags, and the run status mapped from the Optuna state (queued to the writer;
        only "is this the best trial so far" is decided now, before Optuna records this trial)."""
        if state in ("COMPLETE", "PRUNED") and trial is not None:
            self._log_best(trial, result)
        if not run_id:
            return
        tracking = self.config.tracking
        wants_best = tracking.log_weights == "best" or (tracking.log_weights == "all" and tracking.register_best)
        improved = result is not None and wants_best and self._is_best(value)
        # A confirmation run on the registration seed keeps its model: it may become the study's answer.
        keeps_model = improved or (result is not None and self._answer_candidate(trial))
        meta, weights, best_model = None, None, None
        if result is not None:
            # Queue only host-side data: the result's models (teacher, every stage) stay on the device and would
            # be held there for as long as the queue is behind.
            model = result.student
            meta = {"arch": model.arch, "num_classes": model.num_classes, "in_channels": model.in_channels,
                    "group_widths": model.group_widths, "model_groups": model.custom_groups}
            if tracking.log_weights == "all" or (tracking.log_weights == "best" and keeps_model):
                weights = cpu_state(model)
            if keeps_model and tracking.register_best and weights is not None and result.example_input is not None:
                best_model = (cpu_copy(model), result.example_input)  # logged as an MLflow PyTorch model
            result = dataclasses.replace(result, student=None, models={})
        self._submit(self._end_trial, run_id, state, result, reason, (improved, value), meta, weights, best_model)

    def _answer_candidate(self, trial) -> bool:
        """A confirmation run on the registration seed (`confirm.registration_seed`), whose model is registered
        as `<study>-best` if its configuration becomes the verdict's answer."""
        from study.confirm.confirmation import is_companion, registration_seed

        if trial is None or not is_companion(self.study) or self.config.tracking.log_weights == "none":
            return False
        return TrialRecord(trial).seed == registration_seed(self.config)

    def _log_best(self, trial, result) -> None:
        # The parent run's `best_target_val_acc`: the best delivered target val accuracy of the study's complete
        # trials, at step = its number of finished trials, this one included (it is told to Optuna after this).
        if not self.parent_id or "confirm_of" in self.study.user_attrs:
            return
        finished, best = 1, result.value if result is not None else None
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                               optuna.trial.TrialState.PRUNED)):
            if t.number == trial.number:
                continue
            finished += 1
            acc = TrialRecord(t).delivered["target_val_acc"] if t.state.name == "COMPLETE" else None
            if acc is not None and (best is None or acc > best):
                best = acc
        if best is not None:
            metric = Metric("best_target_val_acc", float(best), int(time.time() * 1000), finished)
            self._submit(self.client.log_batch, self.parent_id, metrics=[metric], synchronous=True)

    def _end_trial(self, run_id, state: str, result, reason: str | None, improved: tuple, meta: dict | None,
                   weights: dict | None, best_model: tuple | None = None) -> None:
        tags = [RunTag("optuna.state", state)]
        if reason:
            tags.append(RunTag("distillstudy.failure" if state in ("FAIL", "KILLED") else "distillstudy.pruned",
                               reason[:5000]))
        metrics = []
        if result is not None:
            metrics = self._final_metrics(result)
            tags += [RunTag("distillstudy.teacher_key", result.teacher.key),
                     RunTag("distillstudy.teacher_cache", result.teacher.cache),
                     RunTag("distillstudy.best_stage", result.best_stage)]
            if self._teacher_runs.get(result.teacher.key):
                tags.append(RunTag("distillstudy.teacher_run_id", self._teacher_runs[result.teacher.key]))
            if result.donor is not None:
                tags.append(RunTag("distillstudy.donor_key", result.donor.key))
                if self._teacher_runs.get(result.donor.key):
                    tags.append(RunTag("distillstudy.donor_run_id", self._teacher_runs[result.donor.key]))
        value = improved[1]
        if value is not None:  # the number the study ranks trials by: the UI's first column worth sorting on
            metrics.append(Metric("value", float(value), int(time.time() * 1000), 0))
        self.client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
        if result is not None:
            self._artifacts_or_warn(run_id, result, improved, meta, weights, best_model)
        self.client.set_terminated(run_id, RUN_STATUS[state])
        with self._lock:
            self._open_runs.discard(run_id)

    def _final_metrics(self, result) -> list[Metric]:
        now, out = int(time.time() * 1000), []
        for stage, s in result.stages.items():
            for k in ("source_val_acc", "source_test_acc", "target_val_acc", "target_test_acc"):
                out.append(Metric(f"eval/{stage}/{k}", getattr(s, k), now, 0))
            out.append(Metric(f"seconds/{stage}", s.seconds, now, 0))
        best = result.stages[result.best_stage]
        for k in ("source_val_acc", "source_test_acc", "target_val_acc", "target_test_acc"):
            out.append(Metric(k, getattr(best, k), now, 0))
        out.append(Metric("student_params", float(result.student_params), now, 0))
        out.append(Metric("trainable_params", float(result.trainable_params), now, 0))
        out.append(Metric("total_epochs", float(result.total_epochs), now, 0))
        if result.epochs_to_threshold is not None:
            out.append(Metric("epochs_to_threshold", float(result.epochs_to_threshold), now, 0))
        out.append(Metric("seconds/total", result.seconds, now, 0))
        return out

    def _artifacts_or_warn(self, run_id: str, *args) -> None:
        # A store that still answers but refuses an artifact or the registration must not leave the run RUNNING
        # (the trial is COMPLETE in Optuna): one warning, and the run is closed. An outage goes on to `_guarded`.
        try:
            self._log_trial_artifacts(run_id, *args)
        except Exception as exc:  # noqa: BLE001 - see above
            if store.is_outage(exc):
                raise
            print(f"warning: run {run_id} closes without its artifacts or registered model "
                  f"({type(exc).__name__}: {mask_url(first_line(exc, 200))})", file=sys.stderr, flush=True)

    def _log_trial_artifacts(self, run_id: str, result, improved: tuple, meta: dict, weights: dict | None,
                             best_model: tuple | None = None) -> None:
        """`improved`: (whether the trial was the study's best when it ended, its objective value)."""
        layer_map = {**meta, "best_stage": result.best_stage, "groups": result.layer_map}
        self.client.log_text(run_id, json.dumps(layer_map, indent=2), "layer_map.json")
        trial_config = self.config.to_dict()
        # The trial's choices as a config a user can rerun with `trial run --config` (every choice pinned).
        choices = TrialChoices.from_flat(result.params)
        trial_config["search"] = {**{k: v for k, v in vars(choices).items() if k != "layers"},
                                  "layers": dict(choices.layers)}
        trial_config["pipeline"]["layer_term"] = choices.layer_term  # the old key agrees with the pinned term
        self.client.log_text(run_id, yaml.safe_dump(trial_config, sort_keys=False), "config.yaml")
        if weights is None:
            return
        self._log_state_dict(run_id, weights, "model")
        model_id = self._log_mlflow_model(run_id, result, best_model) if best_model is not None else None
        if model_id:  # the confirmation's answer is registered from this tag (`answer.publish`)
            self.client.set_tag(run_id, "distillstudy.model_id", model_id)
        if improved[0] and self.config.tracking.register_best:
            self._register(run_id, model_id, improved[1])

    def _is_best(self, value: float | None) -> bool:
        """Whether the trial's objective `value` (the objective tells it; one objective only) beats the study's."""
        if len(self.config.study.objective) > 1 or value is None or "confirm_of" in self.study.user_attrs:
            return False  # a confirmation registers nothing by itself: its answer is registered by `answer.publish`
        direction = self.study.directions[0].name.lower()
        try:
            best = self.study.best_value  # this trial is not told yet, so this is the best of the others
        except ValueError:
            return True
        return value > best if direction == "maximize" else value < best

    def _log_state_dict(self, run_id: str, state: dict, artifact_dir: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state_dict.pt")
            torch.save(state, path)
            self.client.log_artifact(run_id, path, artifact_dir)

    def _log_mlflow_model(self, run_id: str, result, best_model: tuple | None) -> str | None:
        """The delivered model as an MLflow PyTorch model (`mlflow_model.py`); its logged model's id, or None when
        the model cannot be exported (a one-line warning; the registered version is then the weights folder)."""
        if best_model is None:
            return None
        model, example = best_model
        try:
            return log_pytorch_model(self.client, self.uri, self.experiment_id, run_id, model, example,
                                     result.params)
        except Exception as exc:  # noqa: BLE001 - torch.export rejects some user code; the weights still count
            print(f"warning: the best model could not be logged as an MLflow PyTorch model "
                  f"({type(exc).__name__}: {first_line(exc, 200)}); registering its state_dict instead",
                  file=sys.stderr, flush=True)
            return None

    def _register(self, run_id: str, model_id: str | None, value: float) -> None:
        # Decided again under the registry's lock (registry.py): a late worker never registers a worse trial.
        from study.tracking.registry import register_search_best

        # The MLflow PyTorch model (`mlflow.pytorch.load_model("models:/<name>/latest")`); the weights folder
        # only when the model could not be exported.
        maximize = self.study.directions[0].name.lower() == "maximize"
        tags = {"optuna.study": self.study.study_name, "distillstudy.trial": str(self._trial_of(run_id))}
        register_search_best(self.client, self.uri, f"{self.study.study_name}-best", run_id, model_id,
                             value, maximize, tags)

    def _trial_of(self, run_id: str) -> str:
        return self.client.get_run(run_id).data.tags.get("optuna.trial_number", "")

    def _log_params(self, run_id: str, params: dict) -> None:
        items = [Param(str(k), str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

