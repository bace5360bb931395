#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check shardckpt tests benchmarks launch
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
