#!/usr/bin/env bash
# Every GPU check in one go, for a machine lent for minutes: the CUDA save paths
# (benchmarks/cuda_check.py), the training-loop overhead (benchmarks/training_overhead.py, one
# rank per GPU) and the throughput benchmark (launch/bench/gpu-benchmark.sh).
#
#   usage: launch/bench/gpu-checks.sh RESULTS_DIR
#
#   environment: PYTHON (default python3), NPROC (default: the GPUs nvidia-smi lists),
#                BENCH_DIR (checkpoints; default ${TMPDIR:-/tmp}/shardckpt-gpu)
#
# Each part runs under its own time limit and the next part runs whatever the last one did.
# Results: cuda_check.json, training_overhead.{json,png}, throughput/throughput.{json,png},
# throughput/system.txt and checks.log (every part's stderr), all in RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${1:?usage: gpu-checks.sh RESULTS_DIR}
PY=${PYTHON:-python3}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
CKPT=${BENCH_DIR:-${TMPDIR:-/tmp}/shardckpt-gpu}
mkdir -p "$RESULTS" "$CKPT"
LOG="$RESULTS/checks.log"
export PYTHONUNBUFFERED=1
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}
export TORCHRUN
status=0

part() {  # part NAME SECONDS COMMAND...: run one part, its stderr into the log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG" >&2
  timeout "$limit" "$@" >/dev/null 2>>"$LOG"
  rc=$?
  echo "== $name: exit $rc" | tee -a "$LOG" >&2
  [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi -L; "$PY" -c 'import torch; print("torch", torch.__version__)'; } >>"$LOG" 2>&1
part cuda_check "${CUDA_CHECK_S:-100}" "$PY" benchmarks/cuda_check.py \
  --dir "$CKPT/check" --out "$RESULTS/cuda_check.json"
part training_overhead "${OVERHEAD_S:-240}" $TORCHRUN --standalone \
  --nproc-per-node "$NPROC" benchmarks/training_overhead.py --state-mb 1000 \
  --step-time 0.1 --save-every 20 --saves 2 --rounds 2 --profile-saves 2 \
  --dir "$CKPT/overhead" --out "$RESULTS/training_overhead.json" \
  --plot "$RESULTS/training_overhead.png"
part throughput "${THROUGHPUT_S:-160}" bash launch/bench/gpu-benchmark.sh \
  --results "$RESULTS/throughput" --dir "$CKPT/throughput" --reps 2
rm -f "$RESULTS/throughput/bench.log"  # its lines are in the log above as well
rm -rf "$CKPT"
exit "$status"
