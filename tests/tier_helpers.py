"""Shared pieces of the node-local tier's multi-process test modules: the node of each of the
four ranks, their environment, and the fork server they start from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tier_targets as T

NODES = ["0", "0", "1", "1"]  # 2 nodes x 2 ranks


def rank_env(collective_timeout_s: int) -> dict[str, str]:
    """One thread per rank, and collectives that fail after ``collective_timeout_s``."""
    return {"OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": str(collective_timeout_s)}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    """Autouse in every test module that imports it: ranks forked from one server per module
    (:func:`tier_targets.forked_ranks`)."""
    with T.forked_ranks():
        yield
