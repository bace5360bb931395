#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run): GPU count, threads per process and
# which torchrun to use.

# GPUs of this node: CUDA_VISIBLE_DEVICES when set (empty: none), else nvidia-smi, else 0.
count_gpus() {
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

# export OMP_NUM_THREADS (unless set): this node's cores shared among $1 processes, at least 1.
set_omp_threads() {
  local cores threads
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  threads=$(( cores / $1 ))
  [ "$threads" -ge 1 ] || threads=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
}

# RUN=(torchrun ...): $TORCHRUN, else .venv/bin/torchrun here or in this repository, else PATH.
find_torchrun() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -n "${TORCHRUN:-}" ]; then
    read -r -a RUN <<< "$TORCHRUN"
  elif [ -x .venv/bin/torchrun ]; then
    RUN=(.venv/bin/torchrun)
  elif [ -x "$repo/.venv/bin/torchrun" ]; then
    RUN=("$repo/.venv/bin/torchrun")
  else
    RUN=(torchrun)
  fi
}
