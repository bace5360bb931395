"""How checkpoint metadata and commit cost grow with the number of ranks (issue 10).

Simulates FSDP-style jobs with real gloo processes: every rank holds one ``Shard(0)`` DTensor shard
of each of ``--tensors`` global tensors (``--rows`` x ``--cols`` float32 per rank), so the data per
rank stays the same as the world grows. For each world size it saves once (blocking) and loads
once at the same world size, then loads a random subset of tensors into a single plain process.

Reported per world size: commit time on rank 0 (merge the reports, build, check and commit the
manifest), planning time (gather plans to rank 0, plan, tell each rank its writes), manifest
bytes, total metadata bytes (manifest + every shard header), per-rank load-planning time and the
number of shard headers each loading rank read, and the single-process subset load.

    .venv/bin/python benchmarks/scaling.py --worlds 2 8 16 32 --tensors 1000 \\
        --dir /tmp/scaling --out scaling.json --plot scaling.png

Each world size runs under ``torchrun --standalone`` (this script relaunches itself with
``--child``). Absolute times on a shared 2-core machine are noise; the shape of the growth is
the result.

``--simulate 1024 4096`` measures instead rank 0's (and one other rank's) real save planning and
commit against synthetic messages of that many ranks, in one process (``planning_sim.py``):

    .venv/bin/python benchmarks/scaling.py --simulate 1024 4096 --tensors 3000 --out sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch

from common.distributed import run_torchrun
from common.output import pyplot, write_outputs

VALUE_SCALE = 1e-3


def expected(i: int, rows_total: int, cols: int) -> torch.Tensor:
    """The global value of tensor ``i``: distinct per tensor, row and column."""
    r = torch.arange(rows_total, dtype=torch.float32).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.float32).unsqueeze(0)
    return i + VALUE_SCALE * (r * cols + c)


def tensor_key(i: int) -> str:
    return f"layers.{i:05d}.weight"


def build_state(rank: int, world: int, tensors: int, rows: int, cols: int,
                zero: bool = False) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {}
    for i in range(tensors):
        full = expected(i, rows * world, cols)
        local = full[rank * rows:(rank + 1) * rows].clone()
        if zero:
            local.zero_()
        state[tensor_key(i)] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                  shape=full.shape, stride=full.stride())
    return state


def rank_main(rank: int, world: int, root: str, tensors: int, rows: int,
              cols: int) -> dict[str, Any]:
    """One rank: save, then load at the same world size and check every value."""
    import shardckpt
    state = build_state(rank, world, tensors, rows, cols)
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        t0 = time.perf_counter()
        mgr.save(1, state)
        save_s = time.perf_counter() - t0
        saved = dict(mgr.last_save_profile)
        mgr.save(2, state)  # same structure: each rank sends a hash, rank 0 reuses its plan
        again = dict(mgr.last_save_profile)
        dest = build_state(rank, world, tensors, rows, cols, zero=True)
        t0 = time.perf_counter()
        mgr.load(dest, step=1)
        load_s = time.perf_counter() - t0
        loaded = dict(mgr.last_load_profile)
    bad = [k for k in state if not torch.equal(state[k].to_local(), dest[k].to_local())]
    return {"rank": rank, "save_s": save_s, "save_phases": saved, "resave_phases": again,
            "load_s": load_s,
            "load_plan_s": loaded["plan_s"], "load_plan_cpu_s": loaded["plan_cpu_s"],
            "headers_read": loaded["headers_read"],
            "mismatches": bad[:5]}


def metadata_bytes(step_dir: Path) -> dict[str, int]:
    """Bytes of the manifest and of every shard header (the whole index of the checkpoint)."""
    manifest = (step_dir / "manifest.json").stat().st_size
    headers = 0
    files = sorted(step_dir.glob("*.shard"))
    for f in files:
        with open(f, "rb") as fh:
            fh.seek(-32, os.SEEK_END)
            _, length, _, _ = struct.unpack("<QQQ8s", fh.read(32))
        headers += length
    return {"manifest_bytes": manifest, "header_bytes": headers, "files": len(files),
            "metadata_bytes": manifest + headers}


def subset_load(root: str, world: int, tensors: int, rows: int, cols: int, n: int,
                seed: int = 0) -> dict[str, Any]:
    """A plain process (no torch.distributed) loads ``n`` random tensors of the checkpoint."""
    import shardckpt

    picks = sorted(random.Random(seed).sample(range(tensors), min(n, tensors)))
    want: dict[str, Any] = {tensor_key(i): None for i in picks}
    with shardckpt.CheckpointManager(root) as mgr:
        t0 = time.perf_counter()
        mgr.load(want)
        load_s = time.perf_counter() - t0
        profile = mgr.last_load_profile
    bad = [tensor_key(i) for i in picks
           if not torch.equal(want[tensor_key(i)], expected(i, rows * world, cols))]
    return {"tensors": len(picks), "load_s": load_s, "plan_s": profile["plan_s"],
            "headers_read": profile["headers_read"], "mismatches": bad}


def summarize(world: int, ranks: list[dict[str, Any]], meta: dict[str, int],
              subset: dict[str, Any]) -> dict[str, Any]:
    r0 = ranks[0]["save_phases"]
    plan_s = [r["load_plan_s"] for r in ranks]
    plan_cpu = [r["load_plan_cpu_s"] for r in ranks]
    return {
        "world_size": world,
        "commit_s": r0.get("commit", 0.0),
        "commit_cpu_s": r0.get("commit_cpu", 0.0),
        "save_plan_s": r0.get("plan", 0.0),
        "save_plan_cpu_s_rank0": r0.get("plan_cpu", 0.0),
        "save_plan_cpu_s_other_max": max((r["save_phases"].get("plan_cpu", 0.0)
                                          for r in ranks[1:]), default=0.0),
        "resave_plan_cpu_s_rank0": ranks[0]["resave_phases"].get("plan_cpu", 0.0),
        "resave_plan_reused": ranks[0]["resave_phases"].get("plan_reused", 0.0),
        "resave_commit_cpu_s": ranks[0]["resave_phases"].get("commit_cpu", 0.0),
        "save_s": max(r["save_s"] for r in ranks),
        **meta,
        "metadata_bytes_per_rank": meta["metadata_bytes"] / world,
        "load_plan_s_mean": sum(plan_s) / len(plan_s),
        "load_plan_s_max": max(plan_s),
        "load_plan_cpu_s_mean": sum(plan_cpu) / len(plan_cpu),
        "load_plan_cpu_s_max": max(plan_cpu),
        "headers_read_per_rank_max": max(r["headers_read"] for r in ranks),
        # what one loading rank reads (manifest + the headers it needs), against a single
        # global index that every rank would read whole (manifest + every header)
        "index_bytes_read_per_rank": meta["manifest_bytes"] + round(
            meta["header_bytes"] / max(1, meta["files"]) * max(r["headers_read"] for r in ranks)),
        "subset_load": subset,
        "mismatches": sum(len(r["mismatches"]) for r in ranks) + len(subset["mismatches"]),
    }


def child(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = rank_main(rank, world, args.root, args.tensors, args.rows, args.cols)
    Path(args.child_out, f"rank{rank:05d}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.dir, f"world{world:03d}")
    reports = Path(args.dir, f"world{world:03d}-reports")
    for p in (root, reports):
        shutil.rmtree(p, ignore_errors=True)
    reports.mkdir(parents=True)
    run_torchrun(__file__, world, ["--child", "--root", str(root), "--child-out", str(reports),
                                   "--tensors", str(args.tensors), "--rows", str(args.rows),
                                   "--cols", str(args.cols)], timeout=args.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]
    assert len(ranks) == world, f"{len(ranks)} of {world} ranks reported"
    meta = metadata_bytes(root / "step-0000000001")
    subset = subset_load(str(root), world, args.tensors, args.rows, args.cols, args.subset)
    return summarize(world, ranks, meta, subset)


def plot(doc: dict[str, Any], path: str) -> None:
    """Metadata size, save metadata cost and load planning per rank against the world size."""
    plt = pyplot()
    rows = doc["results"]
    worlds = [r["world_size"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(worlds, [r["metadata_bytes"] / 1e6 for r in rows], "o-", label="all metadata")
    axes[0].plot(worlds, [r["manifest_bytes"] / 1e6 for r in rows], "s-", label="manifest")
    axes[0].set(xlabel="ranks", ylabel="MB", title="metadata size")
    axes[0].legend()
    axes[1].plot(worlds, [r["commit_cpu_s"] for r in rows], "o-", label="commit (rank 0)")
    axes[1].plot(worlds, [r["save_plan_cpu_s_rank0"] for r in rows], "s-", label="plan (rank 0)")
    axes[1].plot(worlds, [r["save_plan_cpu_s_other_max"] for r in rows], "^-",
                 label="plan (other ranks, max)")
    axes[1].plot(worlds, [r["resave_plan_cpu_s_rank0"] for r in rows], "v-",
                 label="plan (rank 0, cached)")
    axes[1].set(xlabel="ranks", ylabel="CPU s", title="save metadata cost")
    axes[1].legend()
    axes[2].plot(worlds, [r["load_plan_cpu_s_mean"] for r in rows], "o-", label="mean")
    axes[2].plot(worlds, [r["load_plan_cpu_s_max"] for r in rows], "s-", label="max")
    axes[2].set(xlabel="ranks", ylabel="CPU s", title="load planning per rank")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 16, 32])
    ap.add_argument("--tensors", type=int, default=1000, help="tensors per rank (default 1000)")
    ap.add_argument("--rows", type=int, default=4, help="rows of each shard (default 4)")
    ap.add_argument("--cols", type=int, default=16, help="columns (default 16)")
    ap.add_argument("--subset", type=int, default=10,
                    help="tensors the single-process load takes (default 10)")
    ap.add_argument("--dir", default="/tmp/shardckpt-scaling")
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--simulate", type=int, nargs="+", metavar="RANKS",
                    help="simulate rank 0's planning and commit at these world sizes instead")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.simulate:
        from planning_sim import simulate

        sims = [simulate(w, args.tensors, args.rows, args.cols, f"{args.dir}/sim{w}")
                for w in args.simulate]
        write_outputs({"mode": "simulate", "torch": torch.__version__, "results": sims},
                      out=args.out)
        return
    rows = [run_world(w, args) for w in args.worlds]
    base = rows[0]
    for r in rows:
        scale = r["world_size"] / base["world_size"]
        r["metadata_growth_vs_linear"] = r["metadata_bytes"] / base["metadata_bytes"] / scale
        r["manifest_growth_vs_linear"] = r["manifest_bytes"] / base["manifest_bytes"] / scale
    doc = {"tensors_per_rank": args.tensors, "shard_bytes": args.rows * args.cols * 4,
           "torch": torch.__version__, "results": rows}
    write_outputs(doc, out=args.out, plot=args.plot, draw=plot)


if __name__ == "__main__":
    main()
