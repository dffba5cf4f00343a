"""The Slurm recipe on a real Slurm: `sbatch` examples/cluster/slurm_array.sh as a 2-task array against a
PostgreSQL study, and the study reaches its total.

Needs a running single-node cluster (`.ci/slurm-up` installs and starts one; `.ci/run` calls it) and the test
PostgreSQL server. Without them it skips, giving the daemon's own error as the reason (what `.ci/slurm-up` wrote
to $SLURM_CI_DIR/error, else what `scontrol`/`sinfo` said).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from study.config.config import load_config

REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "examples" / "cluster" / "slurm_array.sh"
SLURM_CI_DIR = Path(os.environ.get("SLURM_CI_DIR", "/var/tmp/distillstudy-slurm"))
TINY = ["tracking.enabled=false", "pipeline.device=cpu", "pipeline.cpu_threads=1", "task.max_per_domain=300",
        "pipeline.teacher_epochs=2", "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1",
        "pipeline.retrain_epochs=1", "search.generations=0", "study.confirm.top=0", "study.n_trials=4",
        "study.sampler.kwargs={seed: null}"]
pytestmark = pytest.mark.slow  # a Slurm array of worker processes


def _run(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _slurm_unavailable() -> str | None:
    """Why no Slurm job can run here (the daemons' own words), or None."""
    said = (SLURM_CI_DIR / "error").read_text().strip() if (SLURM_CI_DIR / "error").is_file() else ""
    if shutil.which("sbatch") is None:
        return said or "sbatch not found (install slurm-wlm and munge and start the daemons: .ci/slurm-up)"
    ping = _run("scontrol", "ping")
    if "UP" not in ping.stdout:
        return said or f"slurmctld: {(ping.stdout + ping.stderr).strip()}"
    nodes = _run("sinfo", "-h", "-N", "-o", "%t %E")
    state = nodes.stdout.strip()
    if not state.startswith(("idle", "mix", "alloc")):
        return said or f"slurmd: node state '{state}' {nodes.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)


def test_slurm_array_recipe_runs_a_postgres_study_to_its_total(slurm, postgres_url, tmp_path):
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    config = load_config(REPO / "examples" / "quickstart.yaml",
                         [*TINY, f"study.name={name}", f"pipeline.cache_dir={tmp_path / 'cache'}",
                          f"study.checkpoint_dir={tmp_path / 'checkpoints'}"])
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "CONFIG": str(config_path), "STUDY": name, "DISTILLSTUDY_STORAGE": postgres_url,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # stored, unused: tracking is off
           "VENV": sys.prefix, "PYTHONPATH": str(REPO), "CREATE_STAGGER": "2"}
    # The recipe as written, with this node's sizes instead of a GPU node's: no GPU, one core, little memory.
    cmd = ["sbatch", "--wait", "--parsable", "--array=0-1", "--gres=none", "--cpus-per-task=1", "--mem=1500M",
           "--time=10", f"--job-name={name}", f"--chdir={REPO}", f"--output={tmp_path}/task-%a.out", str(RECIPE)]
    try:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        queue = _run("squeue", "--name", name, "-o", "%i %T %r").stdout
        _run("scancel", "--name", name)
        pytest.fail(f"the array did not finish in 300 s; squeue said:\n{queue}")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("task-*.out")))
    assert job.returncode == 0, f"{job.stdout}{job.stderr}{logs}"
    assert "Traceback" not in logs, logs
    assert {f"task {t} on" for t in (0, 1)} <= {line[:len("task 0 on")] for line in logs.splitlines()}, logs

    study = optuna.load_study(study_name=name, storage=postgres_url)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == config.study.n_trials, logs
    assert {t.user_attrs.get("baseline") for t in finished} >= {"finetune-all", "head-only", "finetune-all-kd"}
    optuna.delete_study(study_name=name, storage=postgres_url)
