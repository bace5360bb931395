"""Rank functions for the lazy snapshot tests (imported by spawned children)."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

import shardckpt
from shardckpt.engine import lazy


def _sharded_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).square().sum().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


def _local_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to_local().clone() for k, v in model.state_dict().items()}


def torn_on_one_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Save step 1 lazily with its copies held; rank 1 changes a DTensor parameter in place
    before they run. Every rank must fail the save naming the key; step 2 then saves whole."""
    opened = threading.Event()
    real = lazy.copy_cpu

    def gated(job: lazy.CopyJob) -> None:
        assert opened.wait(120)
        real(job)

    lazy.copy_cpu = gated
    model, optim = _sharded_model(0)
    state = {"model": model, "optim": optim}
    mgr = shardckpt.CheckpointManager(root, snapshot="lazy")
    handle = mgr.save(1, state)
    if rank == 1:
        with torch.no_grad():
            model[0].weight.mul_(2)  # a DTensor: its own version counter is the one to watch
    opened.set()
    error: BaseException | None = None
    try:
        handle.wait()
    except shardckpt.ShardckptError as exc:
        error = exc
    lazy.copy_cpu = real
    expected = _local_values(model)
    mgr.save(2, state).wait()
    steps = mgr.steps()
    fresh, _ = _sharded_model(7)
    mgr.load({"model": fresh}, step=2)
    got = _local_values(fresh)
    mgr.close()
    return {"error_type": type(error).__name__, "error": str(error), "steps": steps,
            "equal_after_load": all(torch.equal(got[k], expected[k]) for k in expected)}
