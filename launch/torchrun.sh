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
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

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

if [ -z "$NPROC" ]; then
  NPROC=$(count_gpus)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
case "$NPROC" in
  ''|*[!0-9]*|0) echo "launch/torchrun.sh: --nproc must be a positive integer, got '$NPROC'" >&2
                 exit 64 ;;
esac

set_omp_threads "$NPROC"
find_torchrun
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
