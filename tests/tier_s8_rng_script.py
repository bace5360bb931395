"""A worker of the node-loss acceptance job with RNG capture on (tests/test_tier_s8_rng.py): the
job of tests/tier_acceptance_script.py, whose managers now capture the RNG streams, and whose
training also draws from the global torch stream, seeded alike on every rank (so its state is
equal on every rank: the persistent tier writes it once, the local tier on every rank). A
resumed job continues bit-identically only if that stream is restored too."""

from __future__ import annotations

import os
from typing import Any

import tier_acceptance_script as base
import torch
import torch.nn as nn


def manager(root: str) -> Any:
    import shardckpt

    return shardckpt.CheckpointManager(
        os.path.join(root, "persistent"), save_every=5, async_save=False,
        local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2, keep=2))


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int, rank: int) -> str:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
    y = y + torch.rand(4, 8)  # the global stream: restored by the load, else the losses differ
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.item().hex()


if __name__ == "__main__":
    base.manager, base.train_step = manager, train_step
    base.main()
