"""Hugging Face ``Trainer``: its save steps go through shardckpt, and ``train()`` resumes from them.

    from shardckpt.integrations.transformers import ShardckptCallback

    ckpt = ShardckptCallback("/ckpt/run1", retention=shardckpt.RetentionPolicy(keep_last=3))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ckpt])
    trainer.train(resume_from_checkpoint=ckpt.prepare_resume(trainer))   # None on a fresh root

On each of the Trainer's save steps (``save_strategy="steps"`` or ``"epoch"``) the callback saves
the model, optimizer, LR scheduler, every rank's RNG states and the ``TrainerState`` with
shardckpt, and by default stops the Trainer from writing its own checkpoint for that step.

Resuming uses the Trainer's own resume path, which is what skips the batches already trained on:
``prepare_resume`` loads the model from the latest checkpoint and writes a small, model-only
Trainer checkpoint (``model.safetensors`` and ``trainer_state.json``, no pickle) into a local
directory for ``resume_from_checkpoint``. The Trainer finds no optimizer, scheduler or RNG files
there; the callback restores those from shardckpt when training begins, and puts the RNG states
back where the Trainer would (at the first step, or at the epoch's start when the checkpoint
ended an epoch). Not supported: DeepSpeed and FSDP through accelerate (their resume reads their
own checkpoint formats).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

try:
    from safetensors.torch import save_model as save_safetensors_model
    from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardckpt.integrations.transformers needs the `transformers` package: "
                      "pip install 'shardckpt[transformers]'") from exc

import torch

from ..engine.failpolicy import check_on_error
from ..manager import CheckpointManager
from ..repro import capture_rng_state, restore_rng_state

__all__ = ["ShardckptCallback"]

TRAINER_STATE_FILE = "trainer_state.json"  # the names the Trainer reads on resume
WEIGHTS_FILE = "model.safetensors"


class ShardckptCallback(TrainerCallback):
    """Save on the Trainer's save steps with shardckpt; resume through :meth:`prepare_resume`.

    ``manager_kwargs`` go to :class:`~shardckpt.CheckpointManager` (``retention``, ``replicas``,
    ``min_replicas``, ``compression``, ...); every rank must pass the same ones. ``metrics``
    names logged values (``"loss"``, ``"eval_loss"``) whose latest value each manifest records.
    ``keep_trainer_checkpoints=True`` lets the Trainer also write its own ``checkpoint-N``
    directories. ``resume_dir`` is where :meth:`prepare_resume` writes (default:
    ``OUTPUT_DIR/shardckpt-resume``). A checkpoint's step is ``state.global_step``.
    ``snapshot`` (default ``"eager"``) and ``on_error`` (default ``"raise"``; ``"warn"``: a failed
    background save is warned about and training goes on) are the manager's.
    """

    def __init__(self, root: str, *, metrics: Iterable[str] = (),
                 keep_trainer_checkpoints: bool = False, resume_dir: str | None = None,
                 snapshot: str = "eager", on_error: str = "raise",
                 **manager_kwargs: Any) -> None:
        if "save_every" in manager_kwargs:
            raise TypeError("the Trainer's save_steps decide when to save, not save_every=")
        self.root = str(root)
        self.metrics = tuple(metrics)
        self.keep_trainer_checkpoints = keep_trainer_checkpoints
        self.resume_dir = resume_dir
        if snapshot not in ("lazy", "eager"):
            raise ValueError(f"snapshot must be 'lazy' or 'eager', got {snapshot!r}")
        self._manager_kwargs = {**manager_kwargs, "snapshot": snapshot,
                                "on_error": check_on_error(on_error)}
        self.manager: CheckpointManager | None = None
        self.resumed_step: int | None = None
        self._trainer: Any = None
        self._last_saved: int | None = None
        self._resume_step: int | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._rng_at_epoch_begin = False

    # -------------------------------------------------------------------------------- resume
    def prepare_resume(self, trainer: Any) -> str | None:
        """Collective. The directory to pass as ``train(resume_from_checkpoint=...)``, or None
        when ``root`` holds no checkpoint. Call it on every run, on every rank."""
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise NotImplementedError("ShardckptCallback resumes plain and DDP models; DeepSpeed "
                                      "and FSDP through accelerate read their own formats")
        self._trainer = trainer
        manager = self._require_manager()
        step = manager.latest_step()
        if step is None:
            return None
        loaded: dict[str, Any] = {"model": trainer.model, "trainer_state": {}}
        manager.load(loaded, step=step, restore_rng=False)
        path = self.resume_dir or os.path.join(trainer.args.output_dir, "shardckpt-resume")
        if trainer.is_world_process_zero():
            os.makedirs(path, exist_ok=True)
            _write_weights(trainer.model, path)
            TrainerState(**loaded["trainer_state"]).save_to_json(
                os.path.join(path, TRAINER_STATE_FILE))
        trainer.accelerator.wait_for_everyone()  # the other ranks read what rank 0 wrote
        self._resume_step = step
        return path

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:
        manager = self._require_manager()
        step, self._resume_step = self._resume_step, None
        self.resumed_step = self._last_saved = self._pending_rng = None
        self._rng_at_epoch_begin = False
        if step is None:
            latest = manager.latest_step()
            if latest is not None and state.global_step != latest:
                raise ValueError(f"{self.root} holds checkpoints up to step {latest} but train() "
                                 f"starts at step {state.global_step}: pass resume_from_checkpoint"
                                 f"=callback.prepare_resume(trainer), or use an empty root")
            return
        if state.global_step != step:
            raise ValueError(f"train() resumed at step {state.global_step}, not from the "
                             f"directory prepare_resume() wrote for step {step}")
        before = capture_rng_state()
        manager.load({"model": model, "optimizer": _inner(optimizer),
                      "lr_scheduler": lr_scheduler}, step=step)
        self._pending_rng = capture_rng_state()  # the checkpoint's, put back in on_*_begin
        restore_rng_state(before)
        self._rng_at_epoch_begin = args.ignore_data_skip or float(state.epoch or 0).is_integer()
        self._last_saved = self.resumed_step = step

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # The checkpoint ended an epoch: the Trainer restores RNG before it starts the data
        # iterator of the next one (which may draw from it).
        if self._rng_at_epoch_begin:
            self._restore_pending_rng()

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # Mid-epoch: the Trainer restores RNG after skipping the trained batches.
        self._restore_pending_rng()

    def _restore_pending_rng(self) -> None:
        rng, self._pending_rng = self._pending_rng, None
        self._rng_at_epoch_begin = False
        if rng is not None:
            restore_rng_state(rng)

    # ---------------------------------------------------------------------------------- save
    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._maybe_save(state, control, **kwargs)

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._maybe_save(state, control, **kwargs)

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()  # every save committed before train() returns

    def _maybe_save(self, state: TrainerState, control: TrainerControl, model: Any = None,
                    optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if not control.should_save:
            return
        if not self.keep_trainer_checkpoints:
            control.should_save = False  # shardckpt's checkpoint replaces the Trainer's
        if state.global_step == self._last_saved:
            return
        snapshot = dataclasses.asdict(state)
        snapshot["stateful_callbacks"] = self._callback_states(state, control)
        self._require_manager().save(
            state.global_step,
            {"model": model, "optimizer": _inner(optimizer), "lr_scheduler": lr_scheduler,
             "trainer_state": snapshot},
            metrics=self._latest_metrics(state))
        self._last_saved = state.global_step

    def _callback_states(self, state: TrainerState, control: TrainerControl) -> dict[str, Any]:
        """What the Trainer's own save records for stateful callbacks (when the Trainer is
        known, i.e. :meth:`prepare_resume` was called), with the control's state as saved."""
        callbacks = list(self._trainer.callback_handler.callbacks) if self._trainer else []
        found: dict[str, list[Any]] = {}
        for cb in [*callbacks, control]:
            if isinstance(cb, ExportableState):
                found.setdefault(type(cb).__name__, []).append(cb.state())
        # several callbacks of one class are stored as a list, as the Trainer does
        fresh = {name: found[name][0] if len(found[name]) == 1 else found[name] for name in found}
        return {**state.stateful_callbacks, **fresh}

    def _latest_metrics(self, state: TrainerState) -> dict[str, float]:
        found: dict[str, float] = {}
        for entry in reversed(state.log_history):
            for name in self.metrics:
                if name not in found and isinstance(entry.get(name), (int, float)):
                    found[name] = float(entry[name])
        return found

    def _require_manager(self) -> CheckpointManager:
        if self.manager is None:  # collective under torch.distributed
            self.manager = CheckpointManager(self.root, **self._manager_kwargs)
        return self.manager


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _write_weights(model: Any, path: str) -> None:
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(path)  # config.json and model.safetensors, tied weights handled
    else:
        save_safetensors_model(model, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
