#!/usr/bin/env bash
# Create (or reuse) ./.venv-titan for the torchtitan backend's tests (tests_titan/): torch first,
# then torchtitan 0.3.0 and its dependencies under a constraint that keeps that torch (torchtitan
# pins datasets and pulls wandb and tensorboard, so it stays out of .venv and of shardckpt's own
# dependencies), then shardckpt itself (-e, with the export and sign extras: safetensors for the
# HF export, cryptography for trusted_keys) and the test tools.
# SHARDCKPT_TORCH overrides the torch requirement (default: torch==2.13.0, a CPU build where a
# local wheel is configured), as for launch/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SHARDCKPT_TITAN_VENV:-.venv-titan}
TITAN=${SHARDCKPT_TITAN:-torchtitan==0.3.0}
quiet() { grep -v -e "is ignored" -e "^\s*$" || true; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "${SHARDCKPT_TORCH:-torch==2.13.0}" 2>&1 | quiet
fi
# the installed torch, exactly (2.13.0+cpu): no later install may replace it
echo "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
  > "$VENV/constraints.txt"
# one resolver run, so that shardckpt's own requirements (s3fs, fsspec) fit torchtitan's pins;
# skipped (a minute of resolving) while this script and pyproject.toml are as they were
STAMP="$VENV/.setup-stamp"
WANT="$TITAN $(cat pyproject.toml "$0" | sha256sum)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || \
    ! "$VENV/bin/python" -c "import torchtitan, transformers, shardckpt, pytest" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" "$TITAN" "transformers>=4.46" \
    -e ".[export,sign]" "pytest>=8" "pytest-timeout>=2.2" "psutil>=5.9" 2>&1 | quiet
  echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, torchtitan, shardckpt  # noqa: E401
print("shardckpt", shardckpt.__version__, "torch", torch.__version__,
      "torchtitan", md.version("torchtitan"))
PY
