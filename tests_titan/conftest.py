"""tests_titan/: the torchtitan backend against the real torchtitan 0.3.0 classes, run with
.venv-titan (launch/setup_titan.sh; launch/test.sh runs them after the main suite, which does
not collect this directory). Ranks come from tests/harness.py, forked from a fork server that
has torch, torchtitan and transformers imported."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness

PRELOAD = (*harness.PRELOAD, "torchtitan.components.checkpointer",
           "torchtitan.components.optimizer", "transformers", "titan_targets")


@pytest.fixture(scope="session", autouse=True)
def _forked_ranks() -> Iterator[None]:
    with harness.start_method("forkserver", PRELOAD):
        yield
