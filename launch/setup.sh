#!/usr/bin/env bash
# Create (or reuse) ./.venv with torch and shardckpt installed for development.
# SHARDCKPT_TORCH overrides the torch requirement (default: torch==2.13.0, a CPU build where a
# local wheel is configured; on a GPU box, e.g. SHARDCKPT_TORCH="torch==2.13.0" from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SHARDCKPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "${SHARDCKPT_TORCH:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v -e "is ignored" -e "^\s*$" || true
"$VENV/bin/python" -c "import torch, shardckpt; print('shardckpt', shardckpt.__version__, 'torch', torch.__version__)"
