#!/usr/bin/env bash
# Run a training script on every GPU of this machine (or one CPU process) under torchrun.
#
#   usage: launch/torchrun.sh [--dry-run] [--nproc N] [--] SCRIPT.py [ARGS...]
#          launch/torchrun.sh [--dry-run] [--nproc N] -- -m PACKAGE.MODULE [ARGS...]
#
#   --dry-run   print the command (with its environment) instead of running it
#   --nproc N   processes on this node (default: $NPROC, else the number of GPUs that
#               CUDA_VISIBLE_DEVICES or nvidia-smi report, else 1)
#
#   environment:
#     NPROC            as --nproc
#     TORCHRUN         torchrun to use (default: .venv/bin/torchrun in the current directory
#                      or in this repository, else torchrun on PATH)
#     OMP_NUM_THREADS  threads per process (default: CPU cores / NPROC, at least 1)
#     SHARDCKPT_*      shardckpt knobs (docs/operations.md); passed through to every rank
#
# One node, standalone rendezvous (torchrun picks a free port), no restarts: a failed rank
# fails the job, and the next run resumes from the latest committed checkpoint.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
NPROC=${NPROC:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nproc) NPROC=${2:?--nproc needs a value}; shift 2 ;;
    --nproc=*) NPROC=${1#--nproc=}; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
               exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "launch/torchrun.sh: no training script given (see --help)" >&2
  exit 64
fi

count_gpus() {
  # Honour CUDA_VISIBLE_DEVICES when it is set (an empty value means no GPU).
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    if [ -z "$CUDA_VISIBLE_DEVICES" ]; then echo 0; return; fi
    local IFS=,
    set -- $CUDA_VISIBLE_DEVICES
    echo $#
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    return
  fi
  echo 0
}

if [ -z "$NPROC" ]; then
  NPROC=$(count_gpus)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
case "$NPROC" in
  ''|*[!0-9]*|0) echo "launch/torchrun.sh: --nproc must be a positive integer, got '$NPROC'" >&2
                 exit 64 ;;
esac

CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
THREADS=$(( CORES / NPROC ))
[ "$THREADS" -ge 1 ] || THREADS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}

if [ -n "${TORCHRUN:-}" ]; then
  read -r -a RUN <<< "$TORCHRUN"
elif [ -x .venv/bin/torchrun ]; then
  RUN=(.venv/bin/torchrun)
elif [ -x "$(dirname "$0")/../.venv/bin/torchrun" ]; then
  RUN=("$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/torchrun")
else
  RUN=(torchrun)
fi
CMD=("${RUN[@]}" --standalone --nnodes=1 "--nproc-per-node=$NPROC" --max-restarts=0 "$@")

if [ "$DRY_RUN" = 1 ]; then
  # Everything the ranks will see that matters here: threads and the shardckpt knobs.
  ENV_SHOWN=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
  while IFS= read -r name; do
    ENV_SHOWN+=("$name=${!name}")
  done < <(compgen -e | grep '^SHARDCKPT_' | sort || true)
  printf 'env'
  printf ' %q' "${ENV_SHOWN[@]}" "${CMD[@]}"
  printf '\n'
  exit 0
fi
exec "${CMD[@]}"
