"""The torchtitan recipe (``docs/examples/torchtitan_checkpointer.py``), with stand-ins for
torchtitan's objects: torchtitan itself is not a test dependency (its requirements pin an older
fsspec and pull datasets, wandb and tensorboard), so the stand-ins copy what its checkpointer
sees: model parts, an ``OptimizersContainer`` holding one optimizer per part, an
``LRSchedulersContainer`` saving ``{"last_epoch"}``, a ``StatefulDataLoader`` whose own
``state_dict`` is opaque bytes under ``dp_rank_R``, and the Trainer as ``train_state``.
Single process: one data-parallel rank.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import shardckpt

RECIPE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "torchtitan_checkpointer.py"
_spec = importlib.util.spec_from_file_location("torchtitan_checkpointer", RECIPE)
assert _spec is not None and _spec.loader is not None
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

STEPS = 8


class TitanLoader(StatefulDataLoader):
    """Like torchtitan's ParallelAwareDataloader: its state_dict is bytes under a rank key."""

    def __init__(self, dataset: Any, dp_rank: int, dp_world_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size

    def state_dict(self) -> dict[str, Any]:
        return {f"dp_rank_{self.dp_rank}": repr(super().state_dict()).encode(),
                "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise AssertionError("the recipe must not go through the bytes")


class OptimizersContainer:
    def __init__(self, parts: list[nn.Module]) -> None:
        self.optimizers = [torch.optim.AdamW(p.parameters(), lr=0.05) for p in parts]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad()


class LRSchedulersContainer:
    def __init__(self, optimizers: OptimizersContainer) -> None:
        warmup = lambda step: min(1.0, (step + 1) / 3)  # noqa: E731 - torchtitan's are lambdas too
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup)
                           for o in optimizers.optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s in self.schedulers:
            s.last_epoch = state["last_epoch"]


class TitanTrainer:
    """What torchtitan's Trainer builds and how its train loop calls the checkpointer."""

    def __init__(self, root: str | None, dp_world_size: int = 1) -> None:
        torch.manual_seed(0)
        self.model_parts = [nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Dropout(0.25)),
                            nn.Linear(12, 1)]  # two pipeline stages
        self.optimizers = OptimizersContainer(self.model_parts)
        self.lr_schedulers = LRSchedulersContainer(self.optimizers)
        x = torch.randn(24, 5, generator=torch.Generator().manual_seed(1))
        # sequential, like torchtitan's streaming datasets; the loader's own generator keeps
        # starting its iterator from drawing on torch's global one (which dropout uses)
        self.dataloader = TitanLoader(TensorDataset(x, x.mean(dim=1, keepdim=True)), 0,
                                      dp_world_size, batch_size=4,
                                      generator=torch.Generator().manual_seed(2))
        self.step, self.ntokens_seen = 0, 0
        self.losses: dict[int, float] = {}
        self.checkpointer = None if root is None else recipe.ShardckptTitanCheckpointer(
            root, dataloader=self.dataloader, model_parts=self.model_parts,
            optimizers=self.optimizers, lr_schedulers=self.lr_schedulers,
            states={"train_state": self}, interval=3,
            retention=shardckpt.RetentionPolicy(keep_last=2))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]

    def train(self, stop_after: int = STEPS) -> None:
        if self.checkpointer is not None:
            self.checkpointer.load(step=-1)
        batches = iter(self.dataloader)
        while self.step < stop_after:
            self.step += 1
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(self.dataloader)
                x, y = next(batches)
            loss = nn.functional.mse_loss(self.model_parts[1](self.model_parts[0](x)), y)
            loss.backward()
            self.losses[self.step] = loss.item()
            self.ntokens_seen += x.numel()
            if self.checkpointer is not None:
                self.checkpointer.maybe_wait_for_staging()
            self.optimizers.step()
            self.lr_schedulers.step()
            self.optimizers.zero_grad()
            if self.checkpointer is not None:
                self.checkpointer.save(self.step, last_step=self.step == STEPS)
        if self.checkpointer is not None:
            self.checkpointer.close()


def test_recipe_resumes_bitwise(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    reference = TitanTrainer(None)
    reference.train()
    TitanTrainer(root).train(stop_after=5)  # checkpoints 3; step 4 and 5 are lost

    resumed = TitanTrainer(root)
    resumed.train()
    assert sorted(resumed.losses) == list(range(4, STEPS + 1))
    assert resumed.losses == {s: reference.losses[s] for s in resumed.losses}
    assert (resumed.step, resumed.ntokens_seen) == (reference.step, reference.ntokens_seen)
    for part, ref_part in zip(resumed.model_parts, reference.model_parts, strict=True):
        for a, b in zip(part.state_dict().values(), ref_part.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    # torchtitan's container restores last_epoch only (the schedule is a function of it)
    assert [(s.last_epoch, s.get_last_lr()) for s in resumed.lr_schedulers.schedulers] == \
        [(s.last_epoch, s.get_last_lr()) for s in reference.lr_schedulers.schedulers]
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [6, 8]  # keep_last=2, and the last step is always saved
        tree = mgr.manifest(8).tree[1]
    assert set(tree) >= {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"}


def test_torchtitan_loader_state_is_refused_as_is_and_checked_on_load(tmp_path: Path) -> None:
    trainer = TitanTrainer(None)
    with shardckpt.CheckpointManager(str(tmp_path / "raw")) as mgr, \
            pytest.raises(TypeError, match="dataloader/dp_rank_0"):
        # bytes: the reason for the recipe
        mgr.save(1, {"dataloader": trainer.dataloader}, blocking=True)

    root = str(tmp_path / "ckpt")
    TitanTrainer(root).train(stop_after=3)
    two_ranks = TitanTrainer(root, dp_world_size=2)
    with pytest.raises(ValueError, match="data-parallel degree is 1, this job's 2"):
        two_ranks.checkpointer.load()
    two_ranks.checkpointer.close()
