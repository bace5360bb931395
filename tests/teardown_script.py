"""A 2-rank ``torchrun`` training script that tears its process group down before ``close()``
(run by tests/test_teardown.py).

usage: ``teardown_script.py ROOT MODE``, MODE one of:

* ``commit``: step 1 is saved (blocking), step 2 asynchronously; then
  ``dist.destroy_process_group()`` and only then ``mgr.close()``;
* ``fail``: the same, but rank 1 cannot write its shard of step 2 (an injected ``EIO``).

The background save of step 2 is held until ``destroy_process_group()`` has been called (a spy
wrapped around it after the manager exists, so it runs first and releases the save), so the save
is surely still in flight when the teardown begins.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

import shardckpt
import shardckpt.manager as manager_mod
from shardckpt.storage import local as location_mod


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(700 + step)
    return {"model": {"w": torch.randn(128, 32, generator=g)}, "progress": {"step": step}}


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    release = threading.Event()
    real_save_step = manager_mod.save_step

    def held_save_step(comm: Any, locations: Any, state: Any, req: Any, *rest: Any) -> Any:
        if req.step == 2:
            release.wait()
        return real_save_step(comm, locations, state, req, *rest)

    manager_mod.save_step = held_save_step
    if mode == "fail" and rank == 1:
        real_write = location_mod._LocalSink.write

        def write(self: Any, data: Any) -> int:
            if "/step-0000000002/" in self.path:
                raise OSError(errno.EIO, "injected: the disk failed during the last save")
            return real_write(self, data)

        location_mod._LocalSink.write = write  # type: ignore[method-assign]
    mgr = shardckpt.CheckpointManager(root)
    inner = dist.destroy_process_group

    def spy(group: Any = None) -> None:  # the outermost wrapper: the teardown has begun
        release.set()
        inner(group)

    dist.destroy_process_group = spy
    mgr.save(1, state_for(1), blocking=True)
    mgr.save(2, state_for(2))
    dist.destroy_process_group()
    os.write(1, f"rank {rank}: process group destroyed\n".encode())
    mgr.close()
    os.write(1, f"rank {rank}: closed\n".encode())


if __name__ == "__main__":
    main()
