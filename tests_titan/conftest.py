"""tests_titan/: the torchtitan backend against the real torchtitan 0.3.0 classes, run with
.venv-titan (launch/setup_titan.sh; launch/test.sh runs them after the main suite, which does
not collect this directory). Ranks come from tests/harness.py, forked from a fork server that
has torch, torchtitan and transformers imported. A module that sets ``JOBS`` (a titan_targets
function) gets the ``base`` and ``runs`` fixtures of its batch of 2-rank jobs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness

TIMEOUT = 240.0  # seconds, for one batch of jobs
PRELOAD = (*harness.PRELOAD, "torchtitan.components.checkpointer",
           "torchtitan.components.optimizer", "transformers", "titan_targets")


@pytest.fixture(scope="session", autouse=True)
def _forked_ranks() -> Iterator[None]:
    with harness.start_method("forkserver", PRELOAD):
        yield


@pytest.fixture(scope="module")
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The folder of this module's jobs."""
    return str(tmp_path_factory.mktemp(request.module.__name__))


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, base: str) -> list[dict[str, Any]]:
    """What each of 2 ranks returned from the module's ``JOBS``, run once in ``base``."""
    return harness.run_ranks(request.module.JOBS, 2, base, timeout=TIMEOUT)
