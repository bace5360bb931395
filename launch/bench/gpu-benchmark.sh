#!/usr/bin/env bash
# Throughput benchmark on every GPU of this machine: benchmarks/throughput.py under torchrun
# (one rank per GPU, NCCL for training, gloo for the checkpoint protocol), results in one dir.
#
#   usage: launch/bench/gpu-benchmark.sh [--dry-run] [--results DIR] [--dir CKPT_DIR]
#                                        [--size-gb G] [--reps N] [-- MORE throughput.py FLAGS]
#
#   --dry-run       print the commands instead of running them (works without a GPU)
#   --results DIR   where results go (default: bench-results/<UTC time>-<host>)
#   --dir CKPT_DIR  where checkpoints are written: a local NVMe scratch directory, not a
#                   network filesystem (default: $BENCH_DIR, else ${TMPDIR:-/tmp}/shardckpt-bench)
#   --size-gb G     total fp32 state over all ranks (default: 2 per GPU)
#   --reps N        timed repetitions (default 3)
#   after --, anything else throughput.py accepts (--compression zstd:1, --phases ..., --no-fsync)
#
#   environment: NPROC (default: the GPUs CUDA_VISIBLE_DEVICES or nvidia-smi report),
#                TORCHRUN, OMP_NUM_THREADS,
#                SHARDCKPT_* knobs (passed through; --budget-mb sets SHARDCKPT_MEMORY_BUDGET)
#
# Results: throughput.json (the benchmark's document: medians, ratios, targets), throughput.png
# (bar chart of median times), bench.log (its stderr), system.txt (GPUs, driver, git revision,
# knobs). With CUDA, the benchmark keeps the model on the GPUs and shardckpt stages each save into
# pinned host buffers, copied on a side stream (no flag needed). The page cache is dropped before
# read phases when run as root; otherwise the benchmark falls back to fadvise.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../lib.sh
source launch/lib.sh

DRY_RUN=${DRY_RUN:-0}
RESULTS=""
CKPT_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}/shardckpt-bench}
SIZE_GB=""
REPS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --results) RESULTS=${2:?--results needs a directory}; shift 2 ;;
    --dir) CKPT_DIR=${2:?--dir needs a directory}; shift 2 ;;
    --size-gb) SIZE_GB=${2:?--size-gb needs a number}; shift 2 ;;
    --reps) REPS=${2:?--reps needs a number}; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
               exit 0 ;;
    --) shift; break ;;
    *) echo "gpu-benchmark.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done

NPROC=${NPROC:-$(count_gpus)}
case "$NPROC" in
  ''|*[!0-9]*) echo "gpu-benchmark.sh: NPROC must be a number, got '$NPROC'" >&2; exit 64 ;;
esac
if [ "$NPROC" -lt 1 ]; then
  if [ "$DRY_RUN" != 1 ]; then
    echo "gpu-benchmark.sh: no GPU found (nvidia-smi); for a CPU run use" \
         "benchmarks/throughput.py directly (docs/benchmarks.md)" >&2
    exit 2
  fi
  echo "# dry run: no GPU found, showing the command for 1 rank" >&2
  NPROC=1
fi
SIZE_GB=${SIZE_GB:-$(( 2 * NPROC ))}
RESULTS=${RESULTS:-bench-results/$(date -u +%Y%m%dT%H%M%SZ)-$(hostname -s 2>/dev/null || echo host)}
set_omp_threads "$NPROC"
find_torchrun
CMD=("${RUN[@]}" --standalone --nnodes=1 "--nproc-per-node=$NPROC"
     benchmarks/throughput.py
     --size-gb "$SIZE_GB" --reps "$REPS" --dir "$CKPT_DIR"
     --out "$RESULTS/throughput.json" --plot "$RESULTS/throughput.png"
     "$@")

if [ "$DRY_RUN" = 1 ]; then
  ENV_SHOWN=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
  while IFS= read -r name; do
    ENV_SHOWN+=("$name=${!name}")
  done < <(compgen -e | grep '^SHARDCKPT_' | sort || true)
  printf 'mkdir -p %q %q\n' "$RESULTS" "$CKPT_DIR"
  printf 'env'
  printf ' %q' "${ENV_SHOWN[@]}" "${CMD[@]}"
  printf ' 2>&1 >/dev/null | tee %q >&2\n' "$RESULTS/bench.log"
  exit 0
fi

mkdir -p "$RESULTS" "$CKPT_DIR"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "command: ${CMD[*]}"
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
  for name in $(compgen -e | grep '^SHARDCKPT_' | sort || true); do echo "$name=${!name}"; done
  echo
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || true
  nvidia-smi topo -m 2>&1 || true
} > "$RESULTS/system.txt"

echo "== ${CMD[*]}" >&2
# stdout repeats the JSON that --out writes; the log keeps every rank's stderr.
"${CMD[@]}" 2>&1 >/dev/null | tee "$RESULTS/bench.log" >&2
echo "== results in $RESULTS: $(cd "$RESULTS" && ls | tr '\n' ' ')" >&2
