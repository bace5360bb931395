"""Save planning and commit at 1,024-4,096 simulated ranks (issue 31): ``scaling.py --simulate``.

Runs the real save protocol (:func:`shardckpt.engine.save.save_step`) of rank 0, then of one
other rank, in this process, against synthetic messages of the other ranks of an FSDP job: every
rank holds one ``Shard(0)`` shard of each of ``tensors`` global tensors. Only the socket is
replaced: :class:`SimComm` hands the protocol the other ranks' messages as the bytes they would
put on the wire (``encode_json``, zstd-compressed as on gloo), and decodes and encodes exactly as
``GlooComm`` does, on the calling thread, so message encoding and decoding count in the CPU
figures. The other ranks' shard files are sparse files with a real trailer (what the commit's
check reads), written by a side thread, outside the measured thread.

Per world size, for the first save and for a cached save (same structure: each rank sends a
hash): each phase's CPU on the protocol's thread (``<phase>_cpu`` of the save profile), and the
peak RSS above the RSS once the synthetic input was built (VmHWM reset through
``/proc/self/clear_refs``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import xxhash

from shardckpt.engine.comm import decode_json, encode_json
from shardckpt.engine.messages import FileEntry, WriteReport
from shardckpt.engine.save import SaveOptions, SaveRequest, save_step
from shardckpt.engine.writer import shard_name
from shardckpt.format.shard import TRAILER, TRAILER_MAGIC, Codec
from shardckpt.planning.assign import LeafSpec
from shardckpt.planning.plancache import PlanCache, boxes_of, pack, structure_hash
from shardckpt.planning.statedict import Collected, TensorLeaf
from shardckpt.storage import open_location, step_dirname

PLANS, ASSIGN, REPORTS, DECISION = ("save: gather plans", "save: write plan",
                                    "save: gather reports", "save: commit decision")
FILE_BYTES = 1 << 16


def key(i: int) -> str:
    return f"layers.{i:05d}.weight"


def specs_of(rank: int, world: int, tensors: int, rows: int, cols: int) -> list[LeafSpec]:
    return [LeafSpec(key(i), "float32", (rows * world, cols), (rank * rows, 0), (rows, cols),
                     True) for i in range(tensors)]


def tree_of(tensors: int) -> list[Any]:
    return ["d", {key(i): ["T", key(i)] for i in range(tensors)}]


def collected(rank: int, world: int, tensors: int, rows: int, cols: int) -> Collected:
    leaves = [TensorLeaf(s.key, torch.full((rows, cols), float(i)), s.dtype, s.shape, s.offsets,
                         True) for i, s in enumerate(specs_of(rank, world, tensors, rows, cols))]
    return Collected(tree_of(tensors), leaves)


def _structure_text(rank: int, world: int, tensors: int, rows: int, cols: int) -> bytes:
    """What :func:`structure_hash` hashes for this rank's leaves, built from a template."""
    shape, off = f"[{rows * world},{cols}]", rank * rows
    return ("[" + ",".join(f'["{key(i)}","float32",{shape},[{off},0],[{rows},{cols}],true,null]'
                           for i in range(tensors)) + "]").encode()


def plan_payloads(world: int, tensors: int, rows: int, cols: int, step: int,
                  cached: bool) -> list[bytes]:
    """What ranks 1..world-1 put on the wire for the plan gather (first save, or cached): the
    real ``PlanCache.outgoing`` for rank 1, the same with each rank's boxes and hash for the
    others (checked equal to the real thing for the last rank)."""
    tree = tree_of(tensors)
    real = PlanCache().outgoing(specs_of(1, world, tensors, rows, cols), tree)
    base = boxes_of(specs_of(0, world, tensors, rows, cols), 2)
    out = []
    for rank in range(1, world):
        h = xxhash.xxh3_64_hexdigest(_structure_text(rank, world, tensors, rows, cols))
        boxes = base.clone()
        boxes[:, 0] = rank * rows
        leaves = None if cached else {**real["leaves"], "boxes": pack(ctypes.string_at(
            boxes.data_ptr(), boxes.numel() * 8))}
        part = {"hash": h, "digests": {}, "leaves": leaves, "tree_hash": real["tree_hash"]}
        if not cached:  # a cached save: rank 0 acknowledged this tree last time
            part["tree_z"] = real["tree_z"]
        if rank == world - 1:
            specs = specs_of(rank, world, tensors, rows, cols)
            sender = PlanCache(acked=structure_hash(specs), tree_acked=real["tree_hash"]) \
                if cached else PlanCache()
            want = sender.outgoing(specs, tree)
            assert part == want, "the synthetic plan message differs from the real one"
        out.append(encode_json({"error": None, "tree": None, "step": step, **part}))
    return out


def file_entries(rank: int, files: int) -> list[FileEntry]:
    digest = xxhash.xxh3_64_intdigest(f"rank{rank}".encode())
    return [FileEntry(shard_name(rank, i, False), FILE_BYTES, 4096, f"{digest:016x}", (0,))
            for i in range(files)]


def report_payloads(world: int, files: int) -> list[bytes]:
    return [encode_json(WriteReport(None, tuple(file_entries(r, files))).to_json())
            for r in range(1, world)]


def write_fake_files(step_dir: Path, world: int, files: int) -> None:
    """The other ranks' shard files as the commit's check sees them: size and trailer."""
    for rank in range(1, world):
        for f in file_entries(rank, files):
            with open(step_dir / f.name, "wb") as fh:
                fh.seek(FILE_BYTES - TRAILER.size)
                fh.write(TRAILER.pack(f.header_offset, 0, int(f.header_xxh3, 16),
                                      TRAILER_MAGIC))


class SimComm:
    """One rank's side of the protocol's collectives, the other ranks' messages scripted."""

    def __init__(self, rank: int, world: int, inbox: dict[str, Any],
                 on_assign: Any = None, before_reports: Any = None) -> None:
        self.rank, self.world_size, self.inbox = rank, world, inbox
        self.sent: dict[str, bytes] = {}
        self.on_assign, self.before_reports = on_assign, before_reports

    def gather_json(self, obj: Any, what: str = "", dst: int = 0) -> list[Any] | None:
        mine = encode_json(obj)
        self.sent[what] = mine
        if self.rank != dst:
            return None
        if what == REPORTS and self.before_reports is not None:
            self.before_reports()
        return [decode_json(p) for p in [mine, *self.inbox[what]]]

    def broadcast_json(self, obj: Any, what: str = "", src: int = 0) -> Any:
        if self.rank != src:
            return decode_json(self.inbox[what])
        payload = encode_json(obj)
        self.sent[what] = payload
        if what == ASSIGN and self.on_assign is not None:
            self.on_assign()
        return decode_json(payload)

    def all_gather_json(self, obj: Any, what: str = "") -> list[Any]:
        raise NotImplementedError(what)

    def any_true(self, flag: bool, what: str = "") -> bool:
        raise NotImplementedError(what)


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measured(fn: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    gc.collect()
    _reset_peak()
    base, _ = _rss()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _, peak = _rss()
    return result, {"wall_s": wall, "process_cpu_s": cpu,
                    "peak_above_input_mb": (peak - base) / 1e6}


def simulate(world: int, tensors: int, rows: int, cols: int, root: str,
             files: int = 2) -> dict[str, Any]:
    """Rank 0's first and cached saves, then rank 1's, at ``world`` simulated ranks."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    opts = SaveOptions(Codec(None), 16 << 20, files, 4, 2, 512 << 20, 0, True)
    t0 = time.perf_counter()
    inputs = {step: {PLANS: plan_payloads(world, tensors, rows, cols, step, cached=step == 2),
                     REPORTS: report_payloads(world, files)} for step in (1, 2)}
    out: dict[str, Any] = {"world_size": world, "tensors_per_rank": tensors,
                           "leaves": world * tensors, "synthesis_s": time.perf_counter() - t0,
                           "plan_gather_bytes_first": sum(len(p) for p in inputs[1][PLANS]),
                           "plan_gather_bytes_cached": sum(len(p) for p in inputs[2][PLANS])}
    loc = open_location(root)
    cache = PlanCache()
    sent: dict[int, dict[str, bytes]] = {}
    for step, name in ((1, "rank0_first"), (2, "rank0_cached")):
        step_dir = Path(root, step_dirname(step))
        writer: list[threading.Thread] = []

        def start(step_dir: Path = step_dir, writer: list[threading.Thread] = writer) -> None:
            writer.append(threading.Thread(target=write_fake_files, args=(step_dir, world, files)))
            writer[0].start()

        comm = SimComm(0, world, inputs[step], start, lambda w=writer: w[0].join())
        state = collected(0, world, tensors, rows, cols)
        req = SaveRequest(step, {}, (), {})
        result, m = measured(save_step, comm, [loc], {}, req, opts, state, 1, cache)
        assert result.manifest is not None
        sent[step] = comm.sent
        out[name] = {**m, **{k: v for k, v in result.profile.items()}}
    # rank 1: its own plan and report go out, rank 0's assignment and decision come back
    other_root = open_location(os.path.join(root, "rank1"))
    cache1 = PlanCache()
    for step, name in ((1, "rank1_first"), (2, "rank1_cached")):
        comm = SimComm(1, world, {ASSIGN: sent[step][ASSIGN], DECISION: sent[step][DECISION]})
        state = collected(1, world, tensors, rows, cols)
        req = SaveRequest(step, {}, (), {})
        result, m = measured(save_step, comm, [other_root], {}, req, opts, state, 1, cache1)
        out[name] = {**m, **{k: v for k, v in result.profile.items()}}
    for name in ("rank0_first", "rank0_cached", "rank1_first", "rank1_cached"):
        p = out[name]
        p["planning_cpu_s"] = p.get("collect_cpu", 0.0) + p.get("plan_cpu", 0.0)
        p["planning_and_commit_cpu_s"] = p["planning_cpu_s"] + p.get("commit_cpu", 0.0) + \
            p.get("decision_cpu", 0.0)
    return out
