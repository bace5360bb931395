"""A training script that saves and ends without ``close()`` (run by tests/test_exit.py).

usage: ``exit_script.py ROOT MODE`` (plain ``python`` or ``torchrun``), MODE one of:

* ``commit``: step 1 is saved (blocking), step 2 asynchronously, and the script ends;
* ``fail``: the same, but the background save of step 2 fails (single process only);
* ``timeout``: the same as commit, but the manager's exit hook has no time to wait
  (the test sets ``SHARDCKPT_EXIT_WAIT_S=0``).

The write of step 2 is held until the interpreter has begun to exit, so that it is surely still in
flight then: a hook on threading's exit list (the list ``concurrent.futures`` puts its own exit
hook on) releases it. That list runs in reverse order of registration, so for ``commit`` and
``fail`` the release is registered after the manager exists (it runs before the manager's hook);
for ``timeout`` it is registered before (it runs after the manager gave up).
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


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(500 + step)
    return {"model": {"w": torch.randn(256, 64, generator=g),
                      "b": torch.randn(64, generator=g).to(torch.bfloat16)},
            "progress": {"step": step}}


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    release = threading.Event()
    real_save_step = manager_mod.save_step

    def held_save_step(comm: Any, locations: Any, state: Any, req: Any, *rest: Any) -> Any:
        if req.step == 2:
            release.wait()
            if mode == "fail":
                raise OSError(errno.EIO, "injected: the disk went away during the last save")
        return real_save_step(comm, locations, state, req, *rest)

    manager_mod.save_step = held_save_step
    register = threading._register_atexit  # type: ignore[attr-defined]
    if mode == "timeout":
        register(release.set)
    mgr = shardckpt.CheckpointManager(root, retention=shardckpt.RetentionPolicy(keep_last=1))
    if mode != "timeout":
        register(release.set)
    mgr.save(1, state_for(1), blocking=True)
    mgr.save(2, state_for(2))
    os.write(1, f"rank {mgr.rank}: script ends without close()\n".encode())


if __name__ == "__main__":
    main()
