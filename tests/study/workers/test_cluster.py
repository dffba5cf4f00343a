"""Cluster acceptance: several worker PROCESSES on one study, against a real PostgreSQL server (and one SQLite file).

- 3 workers started together run one study to exactly its total; the teacher is trained once.
- `kill -9` of a worker mid-trial: its trial goes FAIL after the grace period, is retried with the same parameters
  (resuming at its last finished stage), its MLflow run is closed as FAILED, and no finished trial changes.
- 2 workers on one SQLite file: no 'database is locked'.
- 2 workers started together: their first sampled trials differ.
- SIGTERM: exit 130, the trial FAIL ('interrupted') and queued again; two SIGTERMs exit at once.
- The teacher cache's lock from two threads: one trains, the other loads.

PostgreSQL tests skip when the server is unreachable, except with $CI set, where they fail.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import optuna
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
CLI = REPO / "cli.py"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
S = optuna.trial.TrialState

# Creating a study in-process opens a heartbeat storage (an Optuna experimental feature, on purpose).
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"), pytest.mark.slow]

# The smallest pipeline: a trial of about a second on one core, 300 images per domain, no born-again rounds.
TINY = ["tracking.enabled=false", "pipeline.device=cpu", "pipeline.cpu_threads=1", "task.max_per_domain=300",
        "pipeline.teacher_epochs=2", "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1",
        "pipeline.retrain_epochs=1", "search.generations=0", "study.confirm.top=0"]
# Trials of a few seconds, for killing one in the middle: finetune (checkpointed), then a longer distill stage.
SLOW = [*TINY, "search.recipe=distill", "pipeline.finetune_epochs=2", "pipeline.distill_epochs=6",
        "study.pruner.name=none", "study.pruner.kwargs={}"]
# Generous limits: unloaded, the whole module takes about two minutes, but a busy 2-core machine stretches it.
LONG = 600
# What never belongs in a worker's stderr.
BAD_STDERR = ("Traceback", "Error", "error:", "database is locked", "failed with")


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    """A teacher cache shared by this module's tests that do not count teacher trainings."""
    return str(tmp_path_factory.mktemp("cluster-cache"))


@pytest.fixture
def workers():
    """Start worker processes (`workers.start(...)`); any still alive at teardown are killed."""
    pool = _Workers()
    yield pool
    pool.kill_all()


@pytest.fixture
def study_name(request):
    """A unique study name; the study is deleted from every storage it was created in at teardown."""
    name = f"cluster-{uuid.uuid4().hex[:12]}"
    urls: list[str] = []
    request.node.created_in = urls
    yield name
    from study.workers.storage import open_storage

    for url in urls:
        try:
            optuna.delete_study(study_name=name, storage=open_storage(url, create=False))
        except Exception:  # noqa: BLE001 - a test that failed before creating it
            pass


# ---- helpers -----------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILLSTUDY_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_args(name: str, url: str, n_trials: int) -> list[str]:
    return ["study", "run", name, "--storage", url, "--n-trials", str(n_trials), "--quiet"]


class Worker:
    def __init__(self, args: list[str], cwd: Path, tag: str):
        self.out_path, self.err_path = cwd / f"{tag}.out", cwd / f"{tag}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([PYTHON, str(CLI), *args], cwd=cwd, stdout=out, stderr=err, env=_env())
        self.tag = tag

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker {self.tag} still running after {timeout} s\nstdout:\n{self.stdout}\n"
                        f"stderr:\n{self.stderr[-4000:]}")

    def describe(self) -> str:
        return f"worker {self.tag} rc={self.proc.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-4000:]}"


class FinishedRun:
    """A `study run` that ran in this process (a worker whose being a process is not what the test is about: one
    that takes over after another died or stopped); read like a finished Worker."""

    def __init__(self, args: list[str], cwd: Path, tag: str):
        from click.testing import CliRunner

        import cli

        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            for key in ("DISTILLSTUDY_STORAGE", "MLFLOW_TRACKING_URI"):
                mp.delenv(key, raising=False)
            result = CliRunner().invoke(cli.main, args)
        self.tag, self.returncode, self.stdout, self.stderr = tag, result.exit_code, result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            self.stderr += "".join(traceback.format_exception(result.exception))

    def describe(self) -> str:
        return f"worker {self.tag} rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-4000:]}"


class _Workers:
    def __init__(self):
        self.all: list[Worker] = []

    def start(self, name: str, url: str, n_trials: int, cwd: Path, tag: str) -> Worker:
        w = Worker(_run_args(name, url, n_trials), cwd, tag)
        self.all.append(w)
        return w

    @staticmethod
    def run_here(name: str, url: str, n_trials: int, cwd: Path, tag: str) -> FinishedRun:
        """The same `study run` in this process, to its end: no interpreter to start and no torch to import."""
        return FinishedRun(_run_args(name, url, n_trials), cwd, tag)

    def kill_all(self) -> None:
        for w in self.all:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def create(request, name: str, url: str, sets: list[str], cwd: Path, via_cli: bool = False) -> None:
    """`study create examples/quickstart.yaml --name NAME --storage URL --set ...` (in-process unless via_cli)."""
    request.node.created_in.append(url)
    if via_cli:
        args = ["study", "create", str(QUICKSTART), "--name", name, "--storage", url]
        for s in sets:
            args += ["--set", s]
        proc = subprocess.run([PYTHON, str(CLI), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"created study '{name}'" in proc.stdout
    else:
        from study.commands import create as create_command

        # In `cwd`, as the CLI would be: an MLflow experiment created here keeps its artifacts in ./mlruns.
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            create_command(str(QUICKSTART), name, url, list(sets), load_if_exists=False)


_storages: dict[str, optuna.storages.RDBStorage] = {}


def trials(name: str, url: str, states=None) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as the storage has them now (read through a plain storage, no heartbeat)."""
    if url not in _storages:
        from study.workers.storage import open_storage

        _storages[url] = open_storage(url, create=False)
    return optuna.load_study(study_name=name, storage=_storages[url]).get_trials(deepcopy=False, states=states)


def wait_for(predicate, timeout: float, what: str, workers: list[Worker] = (), interval: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail naming `what` (and a worker that died). Each poll
    of the storage reads the whole study: polling faster takes CPU from the workers being watched."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for w in workers:
            if w.proc.poll() is not None:
                pytest.fail(f"while waiting for {what}: {w.describe()}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + "".join(f"\n{w.describe()}" for w in workers))


def warm_teacher(sets: list[str]) -> None:
    """Train the config's teacher into its cache now, so workers started next load it instead of one training it."""
    from objectives.device import resolve_device
    from objectives.pipeline import get_task
    from objectives.teacher import get_teacher
    from study.config.config import load_config

    config = load_config(QUICKSTART, sets)
    device = resolve_device(config.pipeline.device)
    task = get_task(config.task, config.pipeline.seed, device)
    get_teacher("teacher", config.model.arch, config.model.width, task, config.model, config.pipeline, device)


def assert_clean_stderr(w: Worker | FinishedRun) -> None:
    err = w.stderr
    bad = [line for line in err.splitlines() if any(b in line for b in BAD_STDERR)]
    assert not bad, f"worker {w.tag} wrote errors to stderr:\n{err[-4000:]}"


def assert_unique_numbers(all_trials) -> None:
    numbers = [t.number for t in all_trials]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {sorted(numbers)}"
    assert sorted(numbers) == list(range(len(numbers)))


def assert_baselines_once(finished) -> None:
    """Each enqueued baseline ran exactly once, although several workers popped the queue together."""
    baselines = sorted(t.user_attrs["baseline"] for t in finished if t.user_attrs.get("baseline"))
    assert baselines == ["finetune-all", "finetune-all-kd", "head-only"], baselines


def running_trial(name: str, url: str, min_number: int = 0, min_step: int = 0):
    """The RUNNING trial numbered >= min_number that has reported a step >= min_step, else None."""
    for t in trials(name, url, (S.RUNNING,)):
        if t.number >= min_number and t.intermediate_values and max(t.intermediate_values) >= min_step:
            return t
    return None


# ---- 1: three workers, one study, one teacher ----------------------------------------------------------------------
def test_three_worker_processes_run_one_study_to_its_total(request, postgres_url, study_name, workers, tmp_path):
    cache = tmp_path / "cache"
    create(request, study_name, postgres_url, [*TINY, f"pipeline.cache_dir={cache}"], tmp_path, via_cli=True)
    procs = [workers.start(study_name, postgres_url, 12, tmp_path, f"w{i}") for i in range(3)]
    for w in procs:
        w.wait(timeout=LONG)
    for w in procs:
        assert w.proc.returncode == 0, w.describe()
        assert_clean_stderr(w)

    all_trials = trials(study_name, postgres_url)
    assert_unique_numbers(all_trials)
    finished = [t for t in all_trials if t.state in FINISHED]
    assert len(finished) == 12, [(t.number, t.state.name) for t in all_trials]
    assert not [t for t in all_trials if t.state in (S.RUNNING, S.WAITING)]
    # Anything else is a trial abandoned because the study was already full, never a real failure.
    for t in all_trials:
        if t.state == S.FAIL:
            assert t.user_attrs.get("skipped"), (t.number, t.user_attrs)
    assert_baselines_once(finished)

    # The teacher was trained once: one file in the cache, one 'miss' over all trials of all workers.
    assert len(list(cache.glob("teacher-*.pt"))) == 1, sorted(p.name for p in cache.iterdir())
    caches = [t.user_attrs["teacher_cache"] for t in all_trials if "teacher_cache" in t.user_attrs]
    assert caches.count("miss") == 1, caches
    assert caches.count("hit") == len(caches) - 1
    assert len({t.user_attrs["teacher_key"] for t in all_trials if "teacher_key" in t.user_attrs}) == 1


# ---- 2: kill -9 in the middle of a trial ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow's store
def test_killed_worker_trial_is_failed_retried_and_resumed(request, postgres_url, study_name, workers, tmp_path,
                                                          shared_cache, mlflow_sqlite):
    from mlflow import MlflowClient

    from objectives.settings import TrialChoices
    from study.trials.stage_checkpoints import trial_checkpoints
    from study.workers.studies import load_study

    mlflow_uri = mlflow_sqlite
    # No baselines: trial 1 is a sampled distill trial (finetune 2 epochs, then 6 of distill, never stopped early).
    sets = [*SLOW, f"pipeline.cache_dir={shared_cache}", "study.heartbeat_interval=1", "study.grace_period=3",
            "tracking.enabled=true", f"tracking.mlflow_uri={mlflow_uri}", "tracking.log_weights=none",
            "tracking.register_best=false", "study.baselines=false", "search.threshold=1.0"]
    create(request, study_name, postgres_url, sets, tmp_path)
    a = workers.start(study_name, postgres_url, 4, tmp_path, "a")

    # Trial 0 completes; kill A in trial 1 once its first stage (finetune) is checkpointed, while it distills.
    victim = wait_for(lambda: running_trial(study_name, postgres_url, min_number=1), LONG, "a running trial 1", [a])
    study, config = load_study(study_name, postgres_url)
    state_file = trial_checkpoints(config, study, postgres_url, TrialChoices.from_flat(victim.user_attrs["choices"]),
                                   victim.user_attrs["seed"], victim.user_attrs["data_seed"]).path
    assert state_file.is_relative_to(Path(shared_cache) / "checkpoints")  # under the cache folder
    wait_for(state_file.exists, 60, f"the stage checkpoint {state_file}", [a], interval=0.01)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=30)
    killed_at = time.time()

    before = trials(study_name, postgres_url)
    victim = next(t for t in before if t.number == victim.number)
    assert victim.state == S.RUNNING, "the victim finished before the kill: make its distill stage longer"
    complete_before = {t.number: (t.values, t.params) for t in before if t.state == S.COMPLETE}
    assert complete_before, "no trial finished before the kill"

    # Mark the checkpoint: a retry that resumes from it reports these values again for the finetune steps
    # (a retry that started over would report the real ones).
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    assert list(state["runs"]) == ["finetune"], list(state["runs"])
    marks = [0.9876 - 0.001 * i for i in range(len(state["runs"]["finetune"]["val_curve"]))]
    state["runs"]["finetune"]["val_curve"] = marks
    torch.save(state, state_file)

    b = workers.run_here(study_name, postgres_url, 4, tmp_path, "b")
    assert b.returncode == 0, b.describe()
    assert_clean_stderr(b)

    after = trials(study_name, postgres_url)
    assert_unique_numbers(after)
    assert len([t for t in after if t.state in FINISHED]) == 4, [(t.number, t.state.name) for t in after]
    dead = next(t for t in after if t.number == victim.number)
    assert dead.state == S.FAIL
    # Failed by the heartbeat check after the grace period, not before.
    assert dead.datetime_complete.timestamp() >= killed_at + 1

    # Exactly one retry, with the same parameters, and it completed.
    retries = [t for t in after if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in after]
    retry = retries[0]
    assert retry.state == S.COMPLETE
    assert retry.params == victim.params
    assert retry.user_attrs["choices"] == victim.user_attrs["choices"]

    # It resumed at the checkpoint: the finetune steps reported again from the checkpoint, then the remaining
    # stages; the whole curve is there (the teacher, step 0, is never reported).
    steps = sorted(retry.intermediate_values)
    assert steps == list(range(1, 2 + 6 + 1)), steps
    assert [retry.intermediate_values[s] for s in (1, 2)] == pytest.approx(marks)
    assert not state_file.parent.exists(), "the checkpoint of a completed trial is removed"

    # No finished trial was lost or changed.
    for number, (values, params) in complete_before.items():
        t = next(t for t in after if t.number == number)
        assert (t.state, t.values, t.params) == (S.COMPLETE, values, params)

    # The killed trial's MLflow run was closed as FAILED, saying the worker died.
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "worker died" in run.data.tags.get("distillstudy.failure", "")
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    assert retry.user_attrs["mlflow_run_id"] != victim.user_attrs["mlflow_run_id"]


# ---- 3: two workers on one SQLite file ------------------------------------------------------------------------------
def test_two_workers_share_one_sqlite_file(request, study_name, workers, tmp_path, shared_cache):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create(request, study_name, url, [*TINY, f"pipeline.cache_dir={shared_cache}"], tmp_path)
    procs = [workers.start(study_name, url, 6, tmp_path, f"w{i}") for i in range(2)]
    for w in procs:
        w.wait(timeout=LONG)
    for w in procs:
        assert w.proc.returncode == 0, w.describe()
        assert "locked" not in w.stderr
        assert_clean_stderr(w)
    all_trials = trials(study_name, url)
    assert_unique_numbers(all_trials)
    finished = [t for t in all_trials if t.state in FINISHED]
    assert len(finished) == 6
    assert_baselines_once(finished)
    assert not [t for t in all_trials if t.state in (S.RUNNING, S.WAITING)]


def test_two_workers_started_together_sample_different_first_trials(request, study_name, workers, tmp_path,
                                                                     shared_cache):
    # Same config, same seed, same trial count at start: with one seed per worker both samplers drew one stream.
    url = f"sqlite:///{tmp_path / 's.db'}"
    # No baselines (each worker's first trial is a sampled one), trials longer than the workers' start-up skew and
    # the teacher trained beforehand, so both workers ask their first trial before either has finished one.
    sets = [*TINY, f"pipeline.cache_dir={shared_cache}", "study.pruner.name=none", "study.pruner.kwargs={}",
            "pipeline.distill_epochs=8", "study.baselines=false"]
    create(request, study_name, url, sets, tmp_path)
    warm_teacher(sets)
    procs = [Worker(["study", "run", study_name, "--storage", url, "--n-trials", "4"], tmp_path, f"w{i}")
             for i in range(2)]  # not --quiet: each worker prints a line per trial it ran
    workers.all.extend(procs)
    for w in procs:
        w.wait(timeout=LONG)
        assert w.proc.returncode == 0, w.describe()
    by_number = {t.number: t for t in trials(study_name, url)}
    firsts = []
    for w in procs:
        ran = [by_number[int(n)] for n in re.findall(r"\] trial\s+(\d+) ", w.stdout)]
        sampled = [t for t in ran if not t.user_attrs.get("baseline")]
        assert sampled, f"worker {w.tag} ran no sampled trial:\n{w.stdout}"
        firsts.append(sampled[0].params)
    assert firsts[0] != firsts[1], f"both workers' first sampled trials are {firsts[0]}"


# ---- 4: graceful stop -----------------------------------------------------------------------------------------------
def test_sigterm_stops_gracefully_and_requeues_the_trial(request, study_name, workers, tmp_path, shared_cache):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create(request, study_name, url, [*SLOW, f"pipeline.cache_dir={shared_cache}"], tmp_path)

    w = workers.start(study_name, url, 6, tmp_path, "term")
    victim = wait_for(lambda: running_trial(study_name, url, min_step=1), LONG, "a trial in training", [w])
    w.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert w.wait(timeout=30) == 130, w.describe()
    assert time.monotonic() - sent < 10, f"took {time.monotonic() - sent:.1f} s to stop"
    assert "interrupted" in w.stdout
    assert "Traceback" not in w.stderr, w.stderr

    by_number = {t.number: t for t in trials(study_name, url)}
    dead = by_number[victim.number]
    assert dead.state == S.FAIL
    assert "interrupted" in dead.user_attrs.get("failure", ""), dead.user_attrs
    retries = [t for t in by_number.values() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1
    assert retries[0].state == S.WAITING
    assert retries[0].system_attrs["fixed_params"] == victim.params  # an enqueued trial has no params yet
    assert retries[0].user_attrs.get("baseline") == victim.user_attrs.get("baseline")
    assert not [t for t in by_number.values() if t.state == S.RUNNING]

    # Two signals in a row: the second exits at once with 130, whether it lands during the graceful stop or after it
    # (when the interpreter is shutting down). A small gap keeps the kernel from merging the two signals into one.
    w2 = workers.start(study_name, url, 6, tmp_path, "term2")
    wait_for(lambda: running_trial(study_name, url, min_step=1), LONG, "a trial in training", [w2])
    w2.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    w2.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert w2.wait(timeout=30) == 130, w2.describe()
    assert time.monotonic() - sent < 3, f"took {time.monotonic() - sent:.1f} s to stop"


# ---- 5: the teacher cache lock -----------------------------------------------------------------------------------
def test_teacher_trained_once_by_two_threads_at_once(tiny_pipeline, tiny_task, tmp_path):
    from objectives.pipeline import get_task
    from objectives.settings import ModelSettings
    from objectives.teacher import get_teacher

    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "cache"))
    device = torch.device("cpu")
    task = get_task(tiny_task(), pipeline.seed, device)
    start = threading.Barrier(2)
    results, errors = [], []

    def load():
        try:
            start.wait()
            results.append(get_teacher("teacher", "digitnet", 1.0, task, ModelSettings(), pipeline, device))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(info.cache for _, info in results) == ["hit", "miss"]
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1
    (net_a, info_a), (net_b, info_b) = results
    assert info_a.key == info_b.key and info_a.path == info_b.path
    for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(va, vb), k
