"""Lightning: checkpoints go through shardckpt, and a second ``fit`` resumes from the latest one.

    from shardckpt.integrations.lightning import ShardckptCallback

    ckpt = ShardckptCallback("/ckpt/run1", every_n_train_steps=100,
                             retention=shardckpt.RetentionPolicy(keep_last=3))
    trainer = L.Trainer(max_steps=10_000, callbacks=[ckpt])
    trainer.fit(model, datamodule)        # resumes from /ckpt/run1's latest checkpoint, if any

Why a callback and not a ``CheckpointIO`` plugin: Lightning's DDP strategies call
``CheckpointIO.save_checkpoint`` on rank 0 only, with one file path per checkpoint, while a
shardckpt save is collective (every rank writes its own shards and RNG state) and keyed by step.
The plugin would also receive Lightning's checkpoint dict, whose model and optimizer entries
are plain state dicts (the optimizer keyed by parameter index, not name). A callback sees the
live objects instead: the module and optimizers go through shardckpt as they are (DDP and
FSDP2/DTensor parameters keyed by name), and everything else Lightning saves (loop progress,
callback and datamodule state, the precision plugin's scaler) is plain data stored in the
manifest's typed JSON tree, never pickled. Hyper-parameters are not stored: a resumed ``fit``
is given the same configuration.

The callback is a Lightning ``Checkpoint``, so the Trainer adds no default ``ModelCheckpoint``
(which would write ``.ckpt`` pickles) and runs it after the other callbacks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardckpt.integrations.lightning needs the `lightning` package: "
                      "pip install 'shardckpt[lightning]'") from exc

from ..engine.failpolicy import check_on_error
from ..manager import CheckpointManager
from ..repro import capture_rng_state, restore_rng_state

__all__ = ["ShardckptCallback"]


class ShardckptCallback(Checkpoint):
    """Save the training state with shardckpt every ``every_n_train_steps`` optimizer steps
    (and, with ``save_last``, after the fit's last batch: ``max_steps`` reached, or the last
    batch of the last epoch), and resume from the latest checkpoint when ``fit`` starts.

    Every rank must be given the same arguments. ``manager_kwargs`` go to
    :class:`~shardckpt.CheckpointManager` (``retention``, ``replicas``, ``min_replicas``,
    ``compression``, ``async_save``, ``storage_options``, ``config``, ...). ``metrics`` names
    entries of ``trainer.callback_metrics`` to record in each manifest (for best-N retention).
    A checkpoint's step is ``trainer.global_step``. ``snapshot`` (default ``"eager"``: every
    checkpoint is the state at the save) and ``on_error`` (default ``"raise"``; ``"warn"``: a
    failed background save is warned about and training goes on) are the manager's.

    Resuming restores the module, optimizers, LR schedulers, the fit loop's progress (and
    stateful data loaders through it), the states of the other callbacks and of the datamodule,
    the precision plugin, and each rank's RNG states. The RNG states are put back at the point
    of the loop where they were taken: at the start of the first batch when the checkpoint was
    taken in the middle of an epoch, before the data loaders start when it ended one.
    """

    def __init__(self, root: str, *, every_n_train_steps: int | None = None,
                 save_last: bool = True, resume: bool = True,
                 metrics: Iterable[str] = (), snapshot: str = "eager", on_error: str = "raise",
                 **manager_kwargs: Any) -> None:
        if every_n_train_steps is not None and (type(every_n_train_steps) is not int
                                                or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be a positive int, "
                             f"got {every_n_train_steps!r}")
        if "save_every" in manager_kwargs:
            raise TypeError("pass every_n_train_steps=, not save_every=")
        self.root = str(root)
        self.every_n_train_steps = every_n_train_steps
        self.save_last = save_last
        self.resume = resume
        self.metrics = tuple(metrics)
        if snapshot not in ("lazy", "eager"):
            raise ValueError(f"snapshot must be 'lazy' or 'eager', got {snapshot!r}")
        self._manager_kwargs = {**manager_kwargs, "snapshot": snapshot,
                                "on_error": check_on_error(on_error)}
        self.manager: CheckpointManager | None = None
        self.resumed_step: int | None = None  # the step the last fit resumed from
        self._last_saved: int | None = None
        self._pending_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.root}]"

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.manager is None:
            # collective under DDP: Lightning has initialised the process group by now
            self.manager = CheckpointManager(self.root, **self._manager_kwargs)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        try:
            self._close()  # a save still in flight commits before the exception goes on
        except Exception as exc:  # the training error is the one to raise
            warnings.warn(f"shardckpt: closing the checkpoint manager after "
                          f"{type(exception).__name__} failed: {exc}", stacklevel=2)

    def _close(self) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()

    # ---------------------------------------------------------------------------------- save
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Saved here, where Lightning's own ModelCheckpoint saves steps: its loops know how
        # to restart from the progress they record at this point.
        step = trainer.global_step
        if step == 0 or step == self._last_saved:
            return  # gradient accumulation: several batches end at one step
        every = self.every_n_train_steps
        if (every and step % every == 0) or (self.save_last and _last_batch_of_fit(trainer)):
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collective: every rank reaches the same hooks at the same step."""
        manager = self._require_manager()
        step = trainer.global_step
        metrics = {}
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                metrics[name] = float(value)
        manager.save(step, self._save_state(trainer, pl_module), metrics=metrics)
        self._last_saved = step

    def _save_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = trainer.datamodule
        return {
            "model": pl_module,
            "optimizers": list(trainer.optimizers),
            "lr_schedulers": [config.scheduler for config in trainer.lr_scheduler_configs],
            "precision": trainer.precision_plugin,
            "loops": {"fit_loop": trainer.fit_loop.state_dict()},
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks
                          if cb is not self and cb.state_dict()},
            "datamodule": datamodule.state_dict() if datamodule is not None else {},
            "trainer": {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                        "lightning_version": pl.__version__},
        }

    # ---------------------------------------------------------------------------------- load
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resumed_step = self._last_saved = self._pending_rng = None
        manager = self._require_manager()
        if not self.resume or manager.latest_step() is None:
            return
        if trainer.ckpt_path is not None:
            raise ValueError(f"fit(ckpt_path={trainer.ckpt_path!r}) and a shardckpt checkpoint "
                             f"under {self.root}: resume from one of them (pass resume=False, "
                             f"or drop ckpt_path)")
        optimizers = list(trainer.optimizers)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        state: dict[str, Any] = {
            "model": pl_module, "optimizers": optimizers, "lr_schedulers": schedulers,
            "precision": trainer.precision_plugin, "loops": {}, "callbacks": {},
            "datamodule": {}, "trainer": {},
        }
        step = manager.load(state)  # collective; restores this rank's RNG states too
        _check_same(state["optimizers"], optimizers, "optimizers", step)
        _check_same(state["lr_schedulers"], schedulers, "LR schedulers", step)
        fit_loop = state["loops"].get("fit_loop")
        if not isinstance(fit_loop, dict):
            raise KeyError(f"step {step} under {self.root} holds no fit loop state")
        trainer.fit_loop.load_state_dict(fit_loop)
        for cb in trainer.callbacks:
            if cb is not self and cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        if state["datamodule"] and trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(state["datamodule"])
        progress = fit_loop.get("epoch_loop.batch_progress", {})
        if not progress.get("is_last_batch", True):
            # Saved mid-epoch: the data iterator existed already, so the next random draw
            # was the next batch's. Lightning creates a new iterator first; put the generators
            # back after that, at the start of the first batch.
            self._pending_rng = capture_rng_state()
        self._last_saved = self.resumed_step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            rng, self._pending_rng = self._pending_rng, None
            restore_rng_state(rng)

    def _require_manager(self) -> CheckpointManager:
        if self.manager is None:
            raise RuntimeError("ShardckptCallback is used outside Trainer.fit (no setup call)")
        return self.manager


def _last_batch_of_fit(trainer: pl.Trainer) -> bool:
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs != -1 and \
        trainer.current_epoch + 1 >= max_epochs and \
        bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _check_same(loaded: list[Any], live: list[Any], what: str, step: int) -> None:
    """A list restored in place holds the same objects; a length mismatch builds a new list."""
    if len(loaded) != len(live) or any(a is not b for a, b in zip(loaded, live)):
        raise ValueError(f"step {step} holds {len(loaded)} {what}, this LightningModule "
                         f"configures {len(live)}")
