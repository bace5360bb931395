"""A worker of the node-loss acceptance job (tests/test_tier_acceptance.py): started by one of
two ``torchrun --nnodes 2 --node-rank i`` agents on 127.0.0.1, 2 workers each; the node id
comes from torchrun's GROUP_RANK. An FSDP2 model (``fully_shard`` on CPU, gloo) trains with SGD
and momentum on batches that are a function of (step, rank).

``train ROOT``: steps 1-10 (batches from per-step generators: no global RNG stream); a
manager saves locally every step and persistently every 5, for steps 1-7 (then it is closed:
the local save of step 7 has committed); training goes on to step 10 uninterrupted.
``resume ROOT``: with an audit hook that fails any open() under another node's path, a fresh
model restores with ``mgr.load(state)`` and trains on to step 10, saving as before. Each rank
writes ROOT/result-RANK.json: the losses, a digest of its final shards and optimizer state,
and (resume) the load profile and warnings."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from typing import Any

import tier_targets as T
import torch
import torch.distributed as dist
import torch.nn as nn

LAST = 10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 32)  # every dim 0 divisible by 4: no empty shard
        self.l2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net()
    fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int, rank: int) -> str:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item().hex()


def digest(model: nn.Module, optim: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.to_local().detach().contiguous().view(torch.uint8).numpy().tobytes())
        buf = optim.state[p]["momentum_buffer"]
        h.update(buf.to_local().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def manager(root: str) -> Any:
    import shardckpt

    # capture_rng=False: the RNG streams' scalars that are equal on every rank (NumPy's cached
    # Gaussian, say) are written once, by one rank, and every rank's load would read that
    # rank's files too; without them each rank reads exactly its own files (the training
    # here draws from no global stream; RNG restores: tests/test_tier_manager.py)
    return shardckpt.CheckpointManager(
        os.path.join(root, "persistent"), save_every=5, async_save=False, capture_rng=False,
        local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2, keep=2))


def train(rank: int, root: str) -> dict[str, Any]:
    model, optim = build(seed=0)  # the same initial weights on every rank
    losses = {}
    mgr = manager(root)
    for step in range(1, LAST + 1):
        losses[step] = train_step(model, optim, step, rank)
        if step <= 7 and mgr.should_save(step):
            mgr.save(step, {"model": model, "optim": optim, "step": step})
        if step == 7:
            mgr.close()  # step 7 is committed locally; the job goes on, unsaved
    return {"losses": losses, "digest": digest(model, optim)}


def resume(rank: int, root: str, nodes: list[str]) -> dict[str, Any]:
    T.forbid_other_nodes(root, os.environ["GROUP_RANK"], nodes)
    model, optim = build(seed=123)
    state: dict[str, Any] = {"model": model, "optim": optim, "step": 0}
    losses = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with manager(root) as mgr:
            start = mgr.load(state)
            profile = dict(mgr.last_load_profile)
            for step in range(start + 1, LAST + 1):
                losses[step] = train_step(model, optim, step, rank)
                if mgr.should_save(step):
                    mgr.save(step, {"model": model, "optim": optim, "step": step})
    return {"start": start, "state_step": state["step"], "tier": profile["tier"],
            "bytes_received": profile["bytes_received"], "bytes_read": profile["bytes_read"],
            "losses": losses, "digest": digest(model, optim),
            "warnings": [str(w.message) for w in caught]}


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, os.environ["GROUP_RANK"])  # test-side only: node ids
    result = train(rank, root) if mode == "train" else resume(rank, root, nodes)
    result["node"] = os.environ["GROUP_RANK"]
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
