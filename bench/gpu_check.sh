#!/usr/bin/env bash
# One prepared check for a CUDA machine: the throughput and overhead benchmarks on the GPU, within 5 minutes.
#
# Installs nothing. It assumes the project is already installed: either `make setup` (creates .venv) or
# `pip install -e .` into the active Python. It uses .venv/bin/python when that exists, else $PYTHON, else python3.
#
#   bash bench/gpu_check.sh                 # on the GPU (DEVICE=cuda), results in $OUT (default bench/out/)
#   DEVICE=cpu bash bench/gpu_check.sh      # the same script on the CPU (how it is tested without a GPU)
#   OUT=/some/dir QUICK=1 bash bench/gpu_check.sh
#
# Writes to $OUT: RESULTS.md (figures, machine, versions, command), results.json, nvidia-smi.txt (if present),
# log.txt (everything printed). Exit code: that of the benchmark run (124 if it hit the time limit).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
DEVICE="${DEVICE:-cuda}"
LIMIT_S="${LIMIT_S:-290}"  # stays inside 5 minutes with start-up
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
mkdir -p "$OUT"

{
  echo "gpu_check: device=$DEVICE python=$PY out=$OUT limit=${LIMIT_S}s host=$(hostname) $(date -Is)"
  command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/log.txt"

if [ "$DEVICE" != "cpu" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: CUDA is not available here; run with DEVICE=cpu to test the script on the CPU" | tee -a "$OUT/log.txt"
  exit 2
fi

QUICK_FLAG=()
[ -n "${QUICK:-}" ] && QUICK_FLAG=(--quick)
# Scratch (studies, MLflow DB, teacher cache) under $OUT/work, removed at the end so only results come back.
timeout "$LIMIT_S" "$PY" bench/run_all.py --device "$DEVICE" --only throughput,overhead "${QUICK_FLAG[@]}" \
  --results "$OUT/RESULTS.md" --json "$OUT/results.json" --workdir "$OUT/work" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
rm -rf "$OUT/work"
echo "gpu_check: exit $rc; results in $OUT" | tee -a "$OUT/log.txt"
exit "$rc"
