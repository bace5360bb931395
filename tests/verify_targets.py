"""Model factories and a rank function for the verifier tests (imported by spawned children and
by ``shardckpt verify --model verify_targets:build_model``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from dist_targets import VOCAB, TinyLM, batch

import shardckpt

STEP = 5


class VerifyLM(TinyLM):
    """TinyLM (tied embedding, uneven shards) returning a dict: logits and a pooled mean."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return {"logits": logits, "pooled": logits.mean(dim=1)}


class ChangedLM(VerifyLM):
    """The same parameters, a different forward: the final norm is skipped."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        logits = self.head(h)
        return {"logits": logits, "pooled": logits.mean(dim=1)}


def build_model() -> nn.Module:
    torch.manual_seed(4321)  # weights differ from the saved ones until the load
    return VerifyLM()


def build_changed_model() -> nn.Module:
    return ChangedLM()


def golden_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [
        torch.randint(0, VOCAB, (4, 6), generator=g),
        torch.tensor([[0, VOCAB - 1, VOCAB - 1]]),   # the extreme token ids
        torch.zeros((2, 0), dtype=torch.int64),     # empty sequences: empty logits, NaN means
    ]


def save_with_golden(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train an FSDP2 VerifyLM two steps, then save step 5 with golden batches."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = VerifyLM()
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        x, y = batch(step, rank)
        loss = nn.functional.cross_entropy(model(x)["logits"].reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        optim.step()
        optim.zero_grad()
    golden = shardckpt.Golden(inputs=golden_inputs(), module="model")
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.save(STEP, {"model": model, "optim": optim, "step": STEP}, golden=golden).wait()
    return {"rank": rank}
