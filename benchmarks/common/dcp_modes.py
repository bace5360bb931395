"""PyTorch Distributed Checkpoint (DCP), called the way a user would, for comparison.

Three save modes: ``dcp.save`` (blocking), ``dcp.async_save`` in its default thread mode, and in
process mode (a daemon process per rank, started on the first save). Saves and loads go through
``get_state_dict``/``set_state_dict``, which shardckpt does inside its own save and load.
Every function here is collective: every rank calls it with the same path.
"""

from __future__ import annotations

from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

#: Save mode of each benchmark phase name.
SAVE_MODES = {"dcp_save": "sync", "dcp_async_save": "thread", "dcp_async_save_process": "process"}


def state_dict(model: nn.Module, optim: Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` from ``get_state_dict`` (what DCP saves and loads)."""
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def writer_kwargs(path: str, fsync: bool) -> dict[str, Any]:
    """Keyword arguments for ``dcp.save``/``async_save`` to ``path``: the plain default call
    (``FileSystemWriter(path)``, which syncs its files) with ``fsync``, else a writer with
    ``sync_files=False``."""
    if fsync:
        return {"checkpoint_id": path}
    return {"checkpoint_id": path,
            "storage_writer": dcp.FileSystemWriter(path, sync_files=False)}


def save(sd: dict[str, Any], path: str, fsync: bool) -> None:
    """``dcp.save(sd)`` to ``path``; returns once it is written."""
    dcp.save(sd, **writer_kwargs(path, fsync))


class PendingSave:
    """An ``async_save`` under way; ``wait()`` returns once it is written."""

    def __init__(self, future: Any, stager: Any) -> None:
        self._future = future
        self._stager = stager

    def wait(self) -> None:
        self._future.result()
        if self._stager is not None:
            self._stager.close()


def start_async_save(sd: dict[str, Any], path: str, *, process: bool,
                     fsync: bool) -> PendingSave:
    """``dcp.async_save(sd)`` to ``path`` in thread mode, or process mode with ``process``.

    Returns when DCP hands control back (the stall). Without ``fsync`` it passes a
    ``FileSystemWriter(sync_files=False)`` and also the default ``DefaultStager`` explicitly: a
    writer given alone would also become the stager, on DCP's older and much slower path.
    """
    kw = writer_kwargs(path, fsync)
    stager = None
    if "storage_writer" in kw:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        kw["async_stager"] = stager
    if process:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kw["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
    return PendingSave(dcp.async_save(sd, **kw), stager)


def load(model: nn.Module, optim: Optimizer, path: str) -> None:
    """``get_state_dict`` + ``dcp.load`` from ``path`` + ``set_state_dict`` into the live state."""
    sd = state_dict(model, optim)
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
