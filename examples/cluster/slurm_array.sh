#!/bin/bash
# distillstudy on Slurm: a job array, one worker per GPU, all on one PostgreSQL-backed study.
# Walkthrough: docs/cluster.md.
#
#   export DISTILLSTUDY_STORAGE='postgresql://distill:<password>@db-host:5432/optuna'   # or source a 0600 file
#   export MLFLOW_TRACKING_URI='http://mlflow-host:5000'
#   sbatch examples/cluster/slurm_array.sh                 # sbatch passes the environment on (--export=ALL)
#
# Preemption: --requeue puts a preempted task back in the queue. On SIGTERM the worker marks its running trial
# FAIL, queues the same parameters again, closes the trial's MLflow run as KILLED and exits 130. If it is
# SIGKILLed first (node failure, KillWait too short) the trial stays RUNNING until its heartbeat is older than
# study.grace_period; the next worker that starts a trial then fails it and re-queues it (up to study.max_retry
# times). Either way the retry resumes at the trial's last finished stage from study.checkpoint_dir.
#
#SBATCH --job-name=distillstudy
#SBATCH --array=0-7                 # 8 workers; more tasks than trials left just wait, then exit
#SBATCH --gres=gpu:1                # one GPU per worker (Slurm sets CUDA_VISIBLE_DEVICES to it)
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue                   # requeue on preemption / node failure
#SBATCH --open-mode=append          # a requeued task appends to its log instead of truncating it
#SBATCH --output=distillstudy-%A_%a.out

set -euo pipefail

CONFIG="${CONFIG:-examples/cluster/cluster.yaml}"
STUDY="${STUDY:-cifar-stl-resnet18}"          # must match study.name in $CONFIG (or the --name you create with)
MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://mlflow-host:5000}"
VENV="${VENV:-/shared/envs/distillstudy}"      # a virtualenv on the shared filesystem with `pip install .`
WORKER_TIMEOUT="${WORKER_TIMEOUT:-}"          # seconds; stop STARTING trials after this (leave one trial's time
                                              # before --time runs out); empty = run until the study is done
CREATE_STAGGER="${CREATE_STAGGER:-20}"        # seconds task 0 has to create the study before the others try
                                              # (they wait this long plus up to as much again, at random)

: "${DISTILLSTUDY_STORAGE:?set DISTILLSTUDY_STORAGE to the study storage URL (postgresql://... or journal:PATH)}"
export DISTILLSTUDY_STORAGE MLFLOW_TRACKING_URI

if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
export PYTHONUNBUFFERED=1
task="${SLURM_ARRAY_TASK_ID:-0}"
echo "task $task on $(hostname), job ${SLURM_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}," \
     "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"

# Create the study once. Every task runs this, so a requeued task needs nothing special. Creation is not atomic
# across processes: two tasks racing on a fresh storage can fail with DuplicatedStudyError (a traceback) or
# "exists with a different config" while the winner is still storing its config. So task 0 goes first, the others
# wait a little, and every task retries; a real config mismatch still fails after the last attempt.
# The --set must be identical in every task: the tracking URI is part of the stored config and of its hash.
if (( task > 0 )); then sleep $(( CREATE_STAGGER + RANDOM % (CREATE_STAGGER + 1) )); fi
created=0
for attempt in 1 2 3 4 5 6; do
    if distillstudy study create "$CONFIG" --name "$STUDY" --load-if-exists \
            --set "tracking.mlflow_uri=$MLFLOW_TRACKING_URI"; then
        created=1
        break
    fi
    echo "study create failed (attempt $attempt); retrying" >&2
    sleep $(( 10 + RANDOM % 20 ))
done
if (( ! created )); then
    echo "could not create or load study '$STUDY'; giving up" >&2
    exit 2
fi

args=(study run "$STUDY" --storage "$DISTILLSTUDY_STORAGE" --device auto)
if [[ -n "$WORKER_TIMEOUT" ]]; then
    args+=(--timeout "$WORKER_TIMEOUT")
fi
# exec: the worker replaces this shell, so Slurm's SIGTERM reaches it directly. Exit codes: 0 the study has its
# total, 130 stopped by a signal (the trial was re-queued), 2 a user error (bad storage URL, unknown study, ...).
exec distillstudy "${args[@]}"
