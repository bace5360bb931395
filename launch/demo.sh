#!/usr/bin/env bash
# Quick start: set up ./.venv, train a 2-rank FSDP2 model on CPU under torchrun, checkpointing
# every 5 steps; stop at step 10; resume from the checkpoint and train to step 20; list the run.
#
# ROOT (default: demo_run/ckpt in the repository; a relative ROOT given here is taken from the
# current folder) must be new, empty, or a folder an earlier demo created: the demo clears it
# first, so it refuses any other folder, before setting anything up, and never deletes files of
# yours. A folder the demo creates holds the marker file .shardckpt-demo.
set -euo pipefail
MARKER=.shardckpt-demo
ROOT=${1:-}
case "$ROOT" in
  *://*) echo "demo.sh: ROOT must be a local folder, got $ROOT" >&2; exit 64 ;;
esac
if [ -n "$ROOT" ] && [ "${ROOT#/}" = "$ROOT" ]; then
  ROOT="$PWD/$ROOT"
fi
cd "$(dirname "$0")/.."
ROOT=${ROOT:-demo_run/ckpt}
if [ -e "$ROOT" ] || [ -L "$ROOT" ]; then
  if [ -L "$ROOT" ] || [ ! -d "$ROOT" ]; then
    echo "demo.sh: $ROOT exists and is not a folder; give the demo a new or empty folder" >&2
    exit 64
  fi
  if [ -f "$ROOT/$MARKER" ]; then
    rm -rf "$ROOT"  # the demo's own folder from an earlier run
  elif [ -n "$(ls -A "$ROOT")" ]; then
    echo "demo.sh: refusing to use $ROOT: it is not empty and the demo did not create it" \
         "(no $MARKER in it). The demo clears its folder first; give it a new or empty" \
         "folder. Nothing was changed." >&2
    exit 64
  fi
fi
mkdir -p "$ROOT"
echo "created by launch/demo.sh, which may delete this folder when it runs again" > "$ROOT/$MARKER"
bash launch/setup.sh
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=1
echo "== first job: steps 1-10"
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" launch/demo.py --root "$ROOT" --steps 10
echo "== second job: resumes from the latest checkpoint, steps 11-20"
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" launch/demo.py --root "$ROOT" --steps 20
echo "== shardckpt ls $ROOT"
.venv/bin/shardckpt ls "$ROOT"
