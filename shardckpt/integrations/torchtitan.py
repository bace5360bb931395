"""torchtitan (>= 0.3): shardckpt as a checkpoint manager, chosen by one line of the job config.

    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    checkpoint=ShardckptCheckpointManager.Config(enable=True, interval=500, keep_latest_k=3,
                                                 async_mode="async")

torchtitan's ``Trainer`` builds it as it builds its DCP ``CheckpointManager`` (same keyword
arguments) and makes the same calls: ``load`` when training starts, ``save`` after every step,
``maybe_wait_for_staging`` before the optimizer step, ``maybe_wait_for_saving`` and ``close``.
Every field of torchtitan's base checkpoint config means what it means for DCP (see
docs/integrations.md for the table); the fields below the base ones are shardckpt's, with the
meaning of :class:`~shardckpt.CheckpointManager`'s keyword arguments of the same names
(``local_*``: its ``LocalTier``), plus ``async_mode`` as the DCP backend's (checked and mapped
in :mod:`.torchtitan_options`).

What a checkpoint holds, with no pickle (``ROOT = dump_folder/folder``, a shardckpt root):

- ``model``: the model parts through torchtitan's ``ModelWrapper`` (one flat, FQN-keyed state
  dict of all parts: pipeline stages keep their keys), FSDP2 / TP DTensors as shards;
- ``optimizer``: the ``OptimizersContainer``'s flattened, FQN-keyed state dict;
- ``lr_scheduler``: the ``LRSchedulersContainer`` (``{"last_epoch"}``);
- ``dataloader``: per data-parallel rank, see :mod:`.torchtitan_io`;
- every other entry of ``states`` (the Trainer's ``train_state``: ``step``, ``ntokens_seen``);
- each rank's RNG states (restored when the world size is unchanged; torchtitan's DCP backend
  does not save them).

What it refuses rather than resuming from the wrong state (a finished run's model-only last
step, a folder of DCP checkpoints, a save below newer committed steps): :mod:`.torchtitan_guard`,
on every rank alike (decided from the same data before any collective: :mod:`.torchtitan_resume`).

Importing this module imports torchtitan; ``import shardckpt`` never does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    from torchtitan.components.checkpointer.base import BaseCheckpointManager, ModelWrapper
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardckpt.integrations.torchtitan needs torchtitan >= 0.3 "
                      "(pip install torchtitan)") from exc

from ..errors import ShardckptError
from ..manager import CheckpointManager
from . import torchtitan_guard as guard
from . import torchtitan_io as io
from . import torchtitan_options as options
from . import torchtitan_resume as resume
from .torchtitan_guard import TitanSaveError
from .torchtitan_io import TitanLoadError
from .torchtitan_options import TitanConfigError
from .torchtitan_resume import HF, MODEL_ONLY

__all__ = ["MODEL_ONLY", "ShardckptCheckpointManager", "TitanConfigError", "TitanLoadError",
           "TitanSaveError"]

MODEL, OPTIMIZER, LR_SCHEDULER, DATALOADER = "model", "optimizer", "lr_scheduler", "dataloader"


class _Flat:
    """The optimizers container through its own flat, FQN-keyed ``state_dict``: shardckpt sees
    an object with a state dict, not a ``torch.optim.Optimizer`` to re-key by itself."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state)


def _join(base: str, folder: str) -> str:
    if not base or "://" in folder or os.path.isabs(folder):
        return folder
    return base.rstrip("/") + "/" + folder if "://" in base else os.path.join(base, folder)


class ShardckptCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint manager contract, saved and loaded by a
    :class:`~shardckpt.CheckpointManager` on ``base_folder/config.folder``. Collective: every
    rank builds it and makes the same calls."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        replicas: list[str] = field(default_factory=list)
        """A list of more locations (paths or fsspec URLs; a plain string is refused); each
        gets a full copy of every checkpoint."""

        min_replicas: int | None = None
        """Locations (folder and replicas) that must succeed for a commit (default: all)."""

        compression: str | None = None
        """None, "zstd" or "zstd:LEVEL"."""

        snapshot: Literal["eager", "lazy"] = "eager"
        """"eager": the state is copied before save returns; "lazy" (opt-in): the manager's
        lazy snapshot, which guards only modules and optimizers given as such, so through
        torchtitan's wrappers every tensor is still copied inside save."""

        on_error: Literal["raise", "warn"] = "raise"
        """"warn": a failed background save is warned about and training goes on."""

        async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
        """As the DCP backend's field: "disabled", save blocks until committed; "async" and
        "async_with_pinned_mem" (the same here), save returns once the state is snapshotted
        and the write goes on in the background."""

        trust_dcp_pickle: bool = False
        """A DCP folder as initial_load_path is read only when True: its index is a pickle."""

        incremental: bool = False
        """A save writes only the chunks whose bytes changed since its base step (the newest
        step committed everywhere) and references the rest (CheckpointManager's)."""

        full_every: int = 0
        """With incremental: a save is full when the newest full step is K saves old (0: never
        forced). Bounds how many steps share one base's bytes."""

        local_path: str | None = None
        """The node-local tier (off when None): each node's path, ``{node}`` its node id;
        relative to dump_folder when relative, as ``folder``."""

        local_every: int = 0
        """A local save every N steps (needed with local_path)."""

        local_copies: int = 2
        """Each rank's local files on this many distinct nodes (its own and the next ones)."""

        local_keep: int = 2
        """The newest local steps each node keeps."""

        local_node: str | None = None
        """This node's id (default: $GROUP_RANK, then $SLURM_NODEID, then the host name)."""

        trusted_keys: list[str] = field(default_factory=list)
        """PEM public keys: only checkpoints one of them signed are loaded (also a shardckpt
        root as initial_load_path; DCP and HF folders are then refused)."""

        def __post_init__(self) -> None:
            options.check_base_types(self)
            BaseCheckpointManager.Config.__post_init__(self)
            options.check(self, io.DTYPES)

    def __init__(self, config: Config, *, dataloader: Any, model_parts: list[Any],
                 optimizers: Any, lr_schedulers: Any, states: dict[str, Any],
                 sd_adapter: Any = None, base_folder: str = "") -> None:
        self.enable = config.enable
        self.save_future = None
        if not self.enable:
            return
        self.config = config
        self.folder = _join(base_folder, config.folder)
        self._newest: int | None = None  # the newest committed step, known once needed
        self.interval = config.interval
        self.keep_latest_k = config.keep_latest_k
        self.sd_adapter = sd_adapter
        if config.last_save_in_hf and sd_adapter is None:
            raise ValueError("checkpoint.last_save_in_hf is True, but the model has no state "
                             "dict adapter (sd_adapter)")
        self.dataloader = dataloader
        self.states = states  # torchtitan's layout: users may look things up here
        self.states.update({MODEL: ModelWrapper(model_parts), OPTIMIZER: optimizers,
                            DATALOADER: dataloader, LR_SCHEDULER: lr_schedulers})
        to_dict = getattr(config, "to_dict", None)
        self.manager = options.build_manager(
            CheckpointManager, self.folder, config, base_folder,
            config={"torchtitan_checkpoint": to_dict()} if callable(to_dict) else None)
        try:  # a folder of DCP checkpoints is refused (on every rank alike, after the manager's
            resume.refuse_dcp_folder(self.manager._comm, self.folder)  # group is made)
        except BaseException:
            self.manager.close()
            raise

    # ------------------------------------------------------------------------------- state
    def _state(self, keys: Any = None) -> dict[str, Any]:
        """What is saved (or, with ``keys``, loaded): the data loader as plain per-rank data."""
        out: dict[str, Any] = {}
        for key, value in self.states.items():
            if value is None or (keys is not None and key not in keys):
                continue
            if key == OPTIMIZER:
                value = _Flat(value)
            elif key == DATALOADER:
                value = io.loader_state(value) if keys is None else {}
            out[key] = value
        return out

    def _loadable(self) -> list[str]:
        for key in self.config.exclude_from_loading:
            if key not in self.states:
                raise ValueError(f"exclude_from_loading: {key!r} is not a checkpointed state "
                                 f"(one of {', '.join(sorted(self.states))})")
        return [k for k in self.states if k not in self.config.exclude_from_loading]

    # ------------------------------------------------------------------------------- save
    def _due(self, step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        return (step == 1 and self.config.enable_first_step_checkpoint) or last_step or \
            self.manager.should_save(step)  # every interval steps, or local_every

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._due(curr_step, last_step):
            return False
        # no wait here: the manager's save waits for the previous one itself, and settles its
        # outcome by on_error (a failure raises on every rank, or is warned about); it writes
        # the tiers that are due, and the first step's checkpoint is persistent too
        if self._newest is None:  # rank 0's listing, so that a refusal is every rank's
            self._newest = resume.on_rank0(self.manager._comm, "torchtitan: newest step",
                                           self.manager.latest_step)
        guard.check_new_step(self.folder, curr_step, self._newest)
        self._newest = curr_step
        if last_step:
            self._save_last_step(curr_step)
            return True
        tier = None
        if curr_step == 1 and self.config.enable_first_step_checkpoint and \
                self.config.local_path is not None:
            tier = "both" if self.config.local_every == 1 else "persistent"
        self.save_future = self.manager.save(curr_step, self._state(), tier=tier)
        return True

    def _save_last_step(self, step: int) -> None:
        """Blocking and persistent (never only node-local), as torchtitan's last save: the
        model only (cast to ``export_dtype``, or under Hugging Face names and then exported as
        an HF folder), or everything."""
        last = {"blocking": True, "tier": "persistent"}
        if not self.config.last_save_model_only:
            self.manager.save(step, self._state(), **last)
            return
        dtype = io.DTYPES[self.config.export_dtype]
        sd = self.states[MODEL].state_dict()
        if not self.config.last_save_in_hf:
            self.manager.save(step, {MODEL: io.cast(sd, dtype)}, tags=(MODEL_ONLY,), **last)
            return
        self.manager.save(step, {MODEL: self.sd_adapter.to_hf(sd)}, tags=(MODEL_ONLY, HF),
                          **last)
        error: Exception | None = None
        if self.manager.rank == 0:
            try:
                io.export_hf(self.folder, step, self.hf_folder(step), dtype, self.sd_adapter)
            except Exception as exc:
                error = exc
        # every rank returns once the folder is there, or raises
        if self.manager._comm.any_true(error is not None, "torchtitan: HF export"):
            raise error or ShardckptError(f"the HF export of step {step} to "
                                          f"{self.hf_folder(step)} failed on rank 0")

    def hf_folder(self, step: int) -> str:
        """Where the last save in Hugging Face format goes: ``FOLDER/hf/step-N``."""
        return os.path.join(self.folder, "hf", f"step-{step}")

    def _maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: an eager save copies the state before it returns, and a lazy
        one is waited for by the optimizer step itself (a step pre-hook)."""

    def _wait_for_saving(self) -> None:
        """Waits for the saves in flight; a failure raises (``on_error="warn"``: is warned
        about and listed in ``manager.failed_saves``, unless the ranks may not share it)."""
        self.save_future = None
        self.manager.wait()

    # ------------------------------------------------------------------------------- load
    def _load(self, step: int = -1) -> bool:
        """Every decision before the collective load is the same on every rank, from the
        same data, and so is every refusal (:mod:`.torchtitan_resume`)."""
        if step == -1 and resume.local_is_newer(self.manager, self.config):
            state = self._state(self._loadable())  # the newest step of either tier
            self.manager.load(state)
            self._restore_loader(state)
            return True
        plan = resume.on_rank0(self.manager._comm, "torchtitan: what to load", lambda:
                               resume.plan_load(self.manager, self.folder, step,
                                                self._loadable, self.states))
        if plan["step"] is None:
            return self._initial_load()
        at = plan["step"] if plan["pinned"] else None  # None: the newest loadable
        if plan["saved"] is not None:  # model-only: in the step's dtypes, then into the model
            self._load_model_only(self.manager, plan["saved"], at)
            return True
        state = self._state(plan["keys"])
        self.manager.load(state, step=at)
        self._restore_loader(state)
        return True

    def _load_model_only(self, manager: CheckpointManager, saved: dict[str, str],
                         step: int | None) -> None:
        """The model from ``step`` of ``manager`` (None: the newest loadable one), whatever
        dtypes it was saved in (``saved``, by key: :func:`.torchtitan_resume.saved_dtypes`)."""
        model = self.states[MODEL]
        sd = io.as_saved(model.state_dict(), saved)
        manager.load({MODEL: sd}, step=step, restore_rng=False)
        model.load_state_dict(sd)

    def _restore_loader(self, state: dict[str, Any]) -> None:
        if DATALOADER in state and self.dataloader is not None:
            io.load_loader_state(self.dataloader, state[DATALOADER])

    def _initial_load(self) -> bool:
        cfg, model = self.config, self.states[MODEL]
        path = cfg.initial_load_path
        if not path and cfg.initial_load_in_hf:
            path = getattr(self.sd_adapter, "hf_assets_path", None)
            if not path:
                raise ValueError("initial_load_in_hf without initial_load_path needs the "
                                 "model's hf_assets_path")
        if not path:
            return False  # a fresh start
        kind = resume.initial_source(self.manager._comm, path, cfg.initial_load_in_hf,
                                     bool(cfg.trusted_keys))
        if kind == "hf":
            io.load_hf_folder(path, model, self.sd_adapter, cfg.initial_load_in_hf_quantized)
        elif kind == "dcp":
            if cfg.initial_load_model_only:
                states = model.state_dict()
            else:
                states = {k: v for k, v in self._state(self._loadable()).items()
                          if k not in (MODEL, DATALOADER)}  # the loader's state is a pickle
                states.update(model.state_dict())
            io.load_dcp_folder(path, states, trusted=cfg.trust_dcp_pickle)
            model.load_state_dict(states)
        else:  # another shardckpt root (its newest step)
            with CheckpointManager(path, async_save=False,
                                   trusted_keys=cfg.trusted_keys) as source:
                got = resume.on_rank0(source._comm, "torchtitan: initial_load_path's step",
                                      lambda: resume.source_plan(source,
                                                                 cfg.initial_load_model_only))
                if got["saved"] is not None:  # model-only, maybe in export_dtype
                    self._load_model_only(source, got["saved"], None)
                    return True
                keys = [MODEL] if cfg.initial_load_model_only else self._loadable()
                state = self._state(keys)
                source.load(state, restore_rng=False)
            self._restore_loader(state)
        return True

    # ------------------------------------------------------------------------------- close
    def _close(self) -> None:
        manager = getattr(self, "manager", None)
        if manager is not None:
            self.save_future = None
            manager.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at teardown there is no one left to tell
            pass
