"""The save phases: each runs once on every rank and returns its result (``Bench.timed``).

``memcpy`` and ``raw_write`` are the bounds (a copy into preallocated buffers; the exact bytes
written to one file per rank); ``shardckpt_async``/``shardckpt_blocking`` and DCP's three modes
are what is compared with them. A save that succeeds is remembered in ``bench.sources`` so that
the load phases of the same repetition read it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common import dcp_modes
from common.fsdp_state import local_tensors

if TYPE_CHECKING:
    from throughput_phases.bench import Bench


def memcpy(bench: Bench, name: str) -> dict[str, Any]:
    """Copy every local tensor into the preallocated, pre-faulted host buffers."""
    def fn() -> dict[str, float]:
        bench.buffers.copy_from(local_tensors(bench.model, bench.optim))
        return {}
    return bench.timed(name, fn)


def raw_write(bench: Bench, name: str) -> dict[str, Any]:
    """Write the rank's exact state bytes to one file (fsynced, with its directory)."""
    path = bench.raw_path("raw_write")
    bench.sources["raw"] = os.path.dirname(path)
    return bench.timed(name, lambda: (bench.write_raw(path), {})[1])


def shardckpt_save(bench: Bench, name: str) -> dict[str, Any]:
    """``mgr.save`` of the whole state: async (stall, then ``wait()``) or blocking."""
    step = bench.next_step()

    def fn() -> dict[str, float]:
        t0 = time.perf_counter()
        if name == "shardckpt_async":
            h = bench.mgr.save(step, bench.state)
            t1 = time.perf_counter()
            h.wait()
            return {"stall_s": t1 - t0, "time_s": time.perf_counter() - t0}
        bench.mgr.save(step, bench.state, blocking=True)
        return {"time_s": time.perf_counter() - t0}
    res = bench.timed(name, fn)
    res["step"] = step
    if "error" not in res:
        bench.sources.setdefault("shardckpt", []).append(step)
    return res


def dcp_save(bench: Bench, name: str) -> dict[str, Any]:
    """``get_state_dict`` + DCP's save in the phase's mode (``dcp_modes.SAVE_MODES``)."""
    path = os.path.join(bench.rep_dir, name)
    mode = dcp_modes.SAVE_MODES[name]

    def fn() -> dict[str, float]:
        t0 = time.perf_counter()
        sd = dcp_modes.state_dict(bench.model, bench.optim)
        t_sd = time.perf_counter() - t0
        if mode == "sync":
            dcp_modes.save(sd, path, bench.fsync)
            return {"time_s": time.perf_counter() - t0, "get_state_dict_s": t_sd}
        pending = dcp_modes.start_async_save(sd, path, process=mode == "process",
                                             fsync=bench.fsync)
        t1 = time.perf_counter()
        pending.wait()
        return {"stall_s": t1 - t0, "time_s": time.perf_counter() - t0,
                "get_state_dict_s": t_sd}
    res = bench.timed(name, fn)
    if "error" not in res:
        bench.sources.setdefault("dcp", []).append(path)
    return res


PHASES: dict[str, Callable[[Bench, str], dict[str, Any]]] = {
    "memcpy": memcpy,
    "raw_write": raw_write,
    "shardckpt_async": shardckpt_save,
    "shardckpt_blocking": shardckpt_save,
    "dcp_save": dcp_save,
    "dcp_async_save": dcp_save,
    "dcp_async_save_process": dcp_save,
}
