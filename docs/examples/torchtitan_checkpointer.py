"""A recipe: checkpoint what torchtitan's Trainer holds with shardckpt. Copy it into your project.

torchtitan (0.3) builds its checkpointer from the keyword arguments below and calls ``load``,
``save``, ``maybe_wait_for_staging``, ``maybe_wait_for_saving`` and ``close`` on it.
``ShardckptTitanCheckpointer`` takes the same arguments and implements those calls; wrapping it
in a ``BaseCheckpointManager`` subclass takes a few more lines (docs/integrations.md).

What is saved, per rank, with no pickle:

- ``model``: the model parts, as modules (FSDP2 / TP DTensors keyed by parameter name);
- ``optimizer``: the torch optimizers inside torchtitan's ``OptimizersContainer``, keyed by
  parameter name through their model part;
- ``lr_scheduler``: the ``LRSchedulersContainer`` (its ``{"last_epoch": N}``);
- ``dataloader``: ``{"dp_rank_R": the StatefulDataLoader's own state, "world_size": W}``.
  torchtitan's loader pickles that state into bytes in its ``state_dict``; the recipe stores the
  unpickled dict it wraps instead, under the same rank-specific key;
- ``train_state`` and any other entry of ``states``: objects with ``state_dict`` (the Trainer's
  ``{"step", "ntokens_seen"}``).
"""

from __future__ import annotations

from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

import shardckpt


class ShardckptTitanCheckpointer:
    """Collective like torchtitan's CheckpointManager: every rank makes the same calls."""

    def __init__(self, root: str, *, dataloader: Any, model_parts: list[Any], optimizers: Any,
                 lr_schedulers: Any, states: dict[str, Any], interval: int,
                 **manager_kwargs: Any) -> None:
        self.dataloader = dataloader
        self.model_parts = list(model_parts)
        self.optimizers = optimizers
        self.lr_schedulers = lr_schedulers
        self.states = dict(states)
        self.manager = shardckpt.CheckpointManager(root, save_every=interval, **manager_kwargs)

    def _state(self) -> dict[str, Any]:
        return {"model": self.model_parts, "optimizer": list(self.optimizers.optimizers),
                "lr_scheduler": self.lr_schedulers, **self.states}

    def _loader_key(self) -> str:
        return f"dp_rank_{self.dataloader.dp_rank}"

    def save(self, curr_step: int, last_step: bool = False) -> bool:
        if not (last_step or self.manager.should_save(curr_step)):
            return False
        state = self._state()
        if self.dataloader is not None:
            state["dataloader"] = {
                self._loader_key(): StatefulDataLoader.state_dict(self.dataloader),
                "world_size": self.dataloader.dp_world_size}
        self.manager.save(curr_step, state)  # returns once staged; writes in the background
        return True

    def load(self, step: int = -1) -> bool:
        if self.manager.latest_step() is None:
            return False
        state = self._state()
        if self.dataloader is not None:
            state["dataloader"] = {}  # filled with what the checkpoint holds for this rank
        self.manager.load(state, step=None if step == -1 else step)
        if self.dataloader is not None:
            saved = state["dataloader"]
            if saved.get("world_size") != self.dataloader.dp_world_size:
                raise ValueError(f"the checkpoint's data-parallel degree is "
                                 f"{saved.get('world_size')}, this job's "
                                 f"{self.dataloader.dp_world_size}: dataloader state cannot "
                                 f"be resharded")
            if self._loader_key() not in saved:
                raise KeyError(f"the checkpoint holds no dataloader state for "
                               f"{self._loader_key()}")
            StatefulDataLoader.load_state_dict(self.dataloader, saved[self._loader_key()])
        return True

    def maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: ``save`` copies the state before it returns."""

    def maybe_wait_for_saving(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()
