#!/usr/bin/env bash
# Quick start: set up ./.venv, train a 2-rank FSDP2 model on CPU under torchrun, checkpointing
# every 5 steps; stop at step 10; resume from the checkpoint and train to step 20; list the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
ROOT=${1:-demo_run/ckpt}
NPROC=${NPROC:-2}
rm -rf "$ROOT"
export OMP_NUM_THREADS=1
echo "== first job: steps 1-10"
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" launch/demo.py --root "$ROOT" --steps 10
echo "== second job: resumes from the latest checkpoint, steps 11-20"
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" launch/demo.py --root "$ROOT" --steps 20
echo "== shardckpt ls $ROOT"
.venv/bin/shardckpt ls "$ROOT"
