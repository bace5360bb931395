#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check shardckpt tests tests_titan benchmarks launch
# tests_titan/ (below) needs its own venv: on a whole run, it is built while the main suite runs
titan_setup=""
if [ $# -eq 0 ]; then
  bash launch/setup_titan.sh > .venv-titan-setup.log 2>&1 &
  titan_setup=$!
  trap 'kill "$titan_setup" 2>/dev/null || true' EXIT  # the main suite failed: stop it too
fi
# --durations=15: the 15 slowest tests, so that the suite's budget (README, Development) is watched
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
# tests_titan/: the torchtitan backend against the real torchtitan 0.3.0, in its own venv
# (launch/setup_titan.sh); on a whole run only, not when pytest arguments are given
if [ -n "$titan_setup" ]; then
  if ! wait "$titan_setup"; then
    cat .venv-titan-setup.log
    echo "launch/setup_titan.sh failed" >&2
    exit 1
  fi
  tail -n 3 .venv-titan-setup.log
  .venv-titan/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests_titan
fi
