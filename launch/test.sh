#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check shardckpt tests benchmarks launch
# --durations=15: the 15 slowest tests, so that the suite's budget (README, Development) is watched
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
