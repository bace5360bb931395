"""Rank functions for the on_error tests (imported by spawned children)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

import shardckpt
from shardckpt.engine import save as save_mod


def failing_writes(rank: int, failing: set[int]) -> None:
    """Rank 1's writes of the steps in ``failing`` fail (a full disk, say)."""
    real = save_mod.write_rank

    def write_rank(*args: Any, **kwargs: Any) -> Any:
        if rank == 1 and kwargs["step"] in failing:
            raise OSError(28, f"injected: no space left on device (step {kwargs['step']})")
        return real(*args, **kwargs)

    save_mod.write_rank = write_rank


def three_failures_in_a_row(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """on_error='warn': saves 1-3 fail on rank 1 only; save 4 must raise on every rank; the
    ranks stay in step (save 5 commits)."""
    failing_writes(rank, {1, 2, 3})
    state = {"w": torch.arange(64, dtype=torch.float32)}
    mgr = shardckpt.CheckpointManager(root, on_error="warn")
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            mgr.save(step, state)
        mgr.wait()  # does not raise under "warn"
        error: BaseException | None = None
        try:
            mgr.save(4, state)
        except shardckpt.ShardckptError as exc:
            error = exc
        mgr.save(5, state)
        mgr.wait()
        caught = [str(w.message) for w in seen if "training goes on" in str(w.message)]
    out = {"error_type": type(error).__name__, "error": str(error),
           "failed": [s for s, _ in mgr.failed_saves],
           "causes": [type(e).__name__ for _, e in mgr.failed_saves],
           "warned": caught, "steps": mgr.steps()}
    mgr.close()
    return out
