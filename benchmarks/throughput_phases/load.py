"""The read phases: each reads what a save phase of the same repetition wrote (or, when that
phase did not run or failed, a copy written untimed just before), from a cold page cache."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common import dcp_modes
from common.output import log

if TYPE_CHECKING:
    from throughput_phases.bench import Bench


def load_phase(bench: Bench, name: str, source: Callable[[], Any],
               paths: Callable[[Any], list[str]], load: Callable[[Any], None],
               verify: bool) -> dict[str, Any]:
    """Make sure a checkpoint exists (untimed), evict it from the page cache, zero the live
    state (untimed), time the load, then check the loaded values. A failure anywhere is
    recorded for this phase (on every rank alike) instead of ending the run."""
    box: dict[str, Any] = {}

    def before() -> None:
        try:
            box["src"] = source()
        except Exception as exc:
            box["error"] = exc
            log(f"{name}: making its source failed: {traceback.format_exc()}", all_ranks=True)
        # every rank calls evict (it holds a barrier), with or without a source
        box["resident"] = bench.cache.evict(paths(box["src"]) if "src" in box else [])
        if verify:
            bench.zero_state()

    def fn() -> dict[str, float]:
        if "error" in box:
            raise box["error"]
        load(box["src"])
        return {}
    res = bench.timed(name, fn, before=before)
    res["resident_bytes_before"] = box["resident"]
    if isinstance(box.get("src"), int):
        res["step"] = box["src"]
    if verify:
        res["verified"] = bench.verify()
        bench.restore_if_needed(res["verified"])
        if not res["verified"]:
            bench.errors.setdefault(name, "loaded values differ from the saved ones")
    return res


def raw_read(bench: Bench, name: str) -> dict[str, Any]:
    """Read the raw file back into the host buffers."""
    def source() -> str:  # raw_write's file, or one written now (untimed)
        if "raw" not in bench.sources:
            path = bench.raw_path("raw_src")
            bench.write_raw(path)
            bench.sources["raw"] = os.path.dirname(path)
        return bench.sources["raw"]

    def read(src: str) -> None:
        bench.read_raw(os.path.join(src, f"rank{bench.rank:05d}.bin"))
    return load_phase(bench, name, source, lambda src: [src], read, verify=False)


def shardckpt_load(bench: Bench, name: str) -> dict[str, Any]:
    """``mgr.load(state, step=...)`` into the live model and optimizer."""
    def source() -> int:  # the step this repetition saved last, or one saved now
        if not bench.sources.get("shardckpt"):
            step = bench.next_step()
            bench.mgr.save(step, bench.state, blocking=True)
            bench.sources["shardckpt"] = [step]
        return bench.sources["shardckpt"][-1]

    def load(step: int) -> None:
        got = bench.mgr.load(bench.state, step=step)
        if got != step:
            raise RuntimeError(f"load returned step {got}, asked for {step}")
    return load_phase(bench, name, source, lambda step: [bench.step_dir(step)], load,
                      verify=True)


def dcp_load(bench: Bench, name: str) -> dict[str, Any]:
    """``get_state_dict`` + ``dcp.load`` + ``set_state_dict``."""
    def source() -> str:  # dcp_save's directory, or one saved now
        if not bench.sources.get("dcp"):
            path = os.path.join(bench.rep_dir, "dcp_src")
            dcp_modes.save(dcp_modes.state_dict(bench.model, bench.optim), path, bench.fsync)
            bench.sources["dcp"] = [path]
        return bench.sources["dcp"][0]

    def load(path: str) -> None:
        dcp_modes.load(bench.model, bench.optim, path)
    return load_phase(bench, name, source, lambda path: [path], load, verify=True)


PHASES: dict[str, Callable[[Bench, str], dict[str, Any]]] = {
    "raw_read": raw_read,
    "shardckpt_load": shardckpt_load,
    "dcp_load": dcp_load,
}
