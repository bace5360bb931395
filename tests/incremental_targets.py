"""Rank functions of the multi-process incremental-save tests (imported by spawned children)."""

from __future__ import annotations

from typing import Any

from incremental_helpers import lora_state, mismatched_keys
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt


def _shard(state: dict[str, Any], world: int) -> dict[str, Any]:
    """The frozen base sharded along dim 0 (as FSDP2 keeps it), the rest replicated."""
    mesh = init_device_mesh("cpu", (world,))
    state["model"] = {k: distribute_tensor(v, mesh, [Shard(0)]) if k.endswith(".weight") else v
                      for k, v in state["model"].items()}
    return state


def save_steps(rank: int, world: int, root: str, steps: list[int]) -> list[Any]:
    out = []
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in steps:
            info = mgr.save(s, _shard(lora_state(s), world)).wait()
            if info is not None:
                out.append([info.step, info.nbytes, list(info.depends_on)])
    return out


def load_and_compare(rank: int, world: int, root: str, step: int) -> list[str]:
    want = lora_state(step)
    got = _shard(lora_state(0), world)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.load(got, step=step) == step
    return mismatched_keys(got, want) + ([] if got["step"] == step else ["step"])
