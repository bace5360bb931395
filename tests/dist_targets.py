"""Rank functions for the multi-process tests (imported by spawned children)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

import shardckpt

VOCAB, DIM, HIDDEN = 37, 12, 20  # 37 and 20 are not divisible by 3 or 4: uneven shards


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.ln(x))))


class TinyLM(nn.Module):
    """Transformer-like: embedding tied to the output head, layer norms, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def build(sharded: bool, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyLM()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    return model, optim, sched


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (4, 6), generator=g)
    return x, torch.roll(x, 1, dims=1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, sched: Any, step: int,
               rank: int) -> float:
    x, y = batch(step, rank)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    optim.step()
    sched.step()
    optim.zero_grad()
    return loss.item()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor as a full (unsharded) CPU tensor, flat-keyed."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    out = {f"model/{k}": v.detach().clone() for k, v in
           get_model_state_dict(model, options=opts).items()}
    osd = get_optimizer_state_dict(model, optim, options=opts)
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            out[f"optim/{fqn}/{name}"] = torch.as_tensor(v).detach().clone()
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in out.items()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"missing {k}" for k in ref if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in ref]
    problems += [f"differs {k}" for k in ref if k in got and not _bits_equal(ref[k], got[k])]
    return problems


def fsdp_save(rank: int, world: int, root: str, ref_path: str) -> dict[str, Any]:
    """Train 3 steps, save at step 3, record the full state and the loss of step 4."""
    model, optim, sched = build(sharded=True)
    for step in range(3):
        train_step(model, optim, sched, step, rank)
    mgr = shardckpt.CheckpointManager(root)
    mgr.save(3, {"model": model, "optim": optim, "sched": sched, "step": 3}).wait()
    mgr.close()
    ref = full_state(model, optim)  # collective
    if rank == 0:
        save_file(ref, ref_path)
    next_loss = train_step(model, optim, sched, 3, rank)
    return {"next_loss": next_loss.hex(), "lr": optim.param_groups[0]["lr"]}


def fsdp_load(rank: int, world: int, root: str, ref_path: str) -> dict[str, Any]:
    """Load the step-3 checkpoint into a fresh FSDP2 model at this world size and compare."""
    model, optim, sched = build(sharded=True, seed=123)
    state = {"model": model, "optim": optim, "sched": sched, "step": 0}
    with shardckpt.CheckpointManager(root) as mgr:
        loaded = mgr.load(state)
    got = full_state(model, optim)
    problems = compare(load_file(ref_path), got) if rank == 0 else []
    next_loss = train_step(model, optim, sched, 3, rank)
    return {"step": loaded, "state_step": state["step"], "problems": problems,
            "next_loss": next_loss.hex(), "lr": optim.param_groups[0]["lr"]}


def plain_load(rank: int, world: int, root: str, ref_path: str) -> dict[str, Any]:
    """Load into an unsharded model in a process without torch.distributed."""
    assert not dist.is_initialized()
    model, optim, sched = build(sharded=False, seed=123)
    state = {"model": model, "optim": optim, "sched": sched, "step": 0}
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.load(state)
    assert model.head.weight is model.emb.weight
    return {"problems": compare(load_file(ref_path), full_state(model, optim)),
            "lr": optim.param_groups[0]["lr"], "step": state["step"]}


def ddp_roundtrip(rank: int, world: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 64),
                                                              nn.Linear(64, 8)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, _ = batch(0, rank)
    model(x.float().repeat(1, 11)[:, :64]).sum().backward()
    optim.step()
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"model": model, "optim": optim})
        ref = full_state(model, optim)
        torch.manual_seed(5)
        model2 = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 64),
                                                                   nn.Linear(64, 8)))
        optim2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
        mgr.load({"model": model2, "optim": optim2})
    state_bytes = sum(v.numel() * v.element_size() for v in ref.values())
    return {"problems": compare(ref, full_state(model2, optim2)), "state_bytes": state_bytes}


class Exploding:
    """A stateful object whose state_dict raises on one rank when armed."""

    def __init__(self, rank: int, bad_rank: int) -> None:
        self.rank, self.bad_rank, self.armed, self.value = rank, bad_rank, False, 1

    def state_dict(self) -> dict[str, int]:
        if self.armed and self.rank == self.bad_rank:
            raise RuntimeError(f"boom on rank {self.rank}")
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.value = sd["value"]


def failing_save(rank: int, world: int, root: str, async_save: bool) -> dict[str, Any]:
    model, optim, _sched = build(sharded=True)
    obj = Exploding(rank, bad_rank=1)
    state = {"model": model, "optim": optim, "obj": obj}
    mgr = shardckpt.CheckpointManager(root, async_save=async_save, snapshot="lazy")
    mgr.save(1, state).wait()
    obj.armed = True
    error = ""
    try:
        mgr.save(2, state).wait()
    except shardckpt.ShardckptError as exc:
        error = f"{type(exc).__name__}: {exc}"
    obj.armed = False
    from shardckpt.engine import lazy
    inflight = len(lazy.inflight())  # a lazy copy begun on rank 0 was cancelled, not left armed
    steps = mgr.steps()
    train_step(model, optim, _sched, 2, rank)
    mgr.save(3, state).wait()  # a copy left armed by step 2 would tear or block this one
    before = full_state(model, optim)
    model2, optim2, _ = build(sharded=True, seed=9)
    loaded = mgr.load({"model": model2, "optim": optim2, "obj": Exploding(rank, 1)})
    mgr.close()
    problems = compare(before, full_state(model2, optim2))
    return {"error": error, "steps": steps, "loaded": loaded, "problems": problems,
            "inflight": inflight,
            "dir_exists": os.path.exists(os.path.join(root, "step-0000000002", "manifest.json"))}


def replicated_roundtrip(rank: int, world: int, root: str, replica: str,
                         storage_options: dict) -> dict[str, Any]:
    """FSDP2 save to a local root and an S3 replica at once, then load from each alone."""
    model, optim, sched = build(sharded=True)
    train_step(model, optim, sched, 0, rank)
    ref = full_state(model, optim)
    with shardckpt.CheckpointManager(root, replicas=[replica],
                                     storage_options=storage_options) as mgr:
        info = mgr.save(1, {"model": model, "optim": optim}).wait()
    problems = {}
    for only in (root, replica):
        model2, optim2, _ = build(sharded=True, seed=5)
        with shardckpt.CheckpointManager(only, storage_options=storage_options) as mgr:
            mgr.load({"model": model2, "optim": optim2})
        problems[only] = compare(ref, full_state(model2, optim2))
    return {"problems": problems, "replicas": list(info.replicas) if info else None}
