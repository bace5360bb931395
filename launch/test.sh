#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check shardckpt tests tests_titan benchmarks launch
# --durations=15: the 15 slowest tests, so that the suite's budget (README, Development) is watched
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
# tests_titan/: the torchtitan backend against the real torchtitan 0.3.0, in its own venv
# (launch/setup_titan.sh); on a whole run only, not when pytest arguments are given
if [ $# -eq 0 ]; then
  bash launch/setup_titan.sh
  .venv-titan/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests_titan
fi
