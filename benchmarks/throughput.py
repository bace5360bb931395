"""Throughput benchmark: shardckpt vs PyTorch DCP vs the disk's raw speed, in the same run.

Run under torchrun (see docs/benchmarks.md):

    torchrun --standalone --nproc-per-node 2 benchmarks/throughput.py \
        --size-gb 1.6 --reps 3 --dir /work/bench_tmp --out results.json --plot results.png

Every rank builds its shard of an FSDP2 (``fully_shard``) stack of Linear layers plus AdamW state
(one real optimizer step), about ``--size-gb`` of fp32 state in total. Each repetition then runs
the save phases and then the load phases, each group in an order rotated by one per repetition
(so drift on a shared machine hits every phase alike), each phase on fresh files, with a barrier
around each. A phase's time is the maximum over the ranks; GB/s is the total state bytes
(1 GB = 1e9 bytes) over that time. Peak RSS is sampled every ~5 ms on each rank.

One JSON document goes to stdout (rank 0) and to ``--out``; logs go to stderr. Anything else the
libraries print on stdout is redirected to stderr so that stdout stays parseable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import sys
import tempfile
import time
from typing import Any

import torch.distributed as dist

from shardckpt.engine import streamcopy

from common.distributed import init_process_group, under_torchrun
from common.machine import git_info, load_average, machine_info
from common.output import capture_stdout, log, write_outputs
from throughput_phases import ALL_PHASES
from throughput_phases.bench import Bench, MiB
from throughput_phases.plot import plot
from throughput_phases.summary import knob_values, notes, summarize


# ------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.6,
                   help="total fp32 state (params + exp_avg + exp_avg_sq) over all ranks, 1e9 B")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions")
    p.add_argument("--warmup-reps", type=int, default=1,
                   help="untimed repetitions of every phase first (first-call costs; reported)")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardckpt-bench"),
                   help="where checkpoints are written (a local disk, not tmpfs)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--plot", default=None, help="PNG bar chart of median times")
    p.add_argument("--compression", default=None, help='shardckpt compression, e.g. "zstd:1"')
    p.add_argument("--budget-mb", type=int, default=None,
                   help="sets SHARDCKPT_MEMORY_BUDGET (MiB); default: the library's knob")
    p.add_argument("--no-fsync", action="store_true",
                   help="no fsync anywhere (SHARDCKPT_FSYNC=0, DCP sync_files=False, raw "
                        "write without fsync): for tmpfs such as /dev/shm")
    p.add_argument("--phases", default=",".join(ALL_PHASES),
                   help=f"comma-separated subset of: {','.join(ALL_PHASES)}")
    p.add_argument("--width", type=int, default=None, help="Linear width (default: by size)")
    p.add_argument("--io-chunk-mb", type=int, default=32, help="raw write/read buffer size")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not evict the page cache before the read phases")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint directories")
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(phases) - set(ALL_PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}; choose from {list(ALL_PHASES)}")
    args.phases = [x for x in ALL_PHASES if x in phases]
    if args.reps < 1 or args.warmup_reps < 0:
        p.error("--reps must be >= 1 and --warmup-reps >= 0")
    return args


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    capture_stdout()
    if not under_torchrun("benchmarks/throughput.py"):
        return 64
    device, backend = init_process_group()
    created_dir = not os.path.exists(args.dir)
    dist.barrier()
    os.makedirs(args.dir, exist_ok=True)
    started = time.time()
    bench = Bench(args, device)
    doc: dict[str, Any] = {}
    if bench.rank == 0:
        doc = {
            "benchmark": "shardckpt throughput (benchmarks/throughput.py)",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["torchrun", "--nproc-per-node",
                                 os.environ.get("LOCAL_WORLD_SIZE", "?"), *sys.argv]),
            "git": git_info(),
            "machine": machine_info(args.dir, fsync=not args.no_fsync),
        }
    warm, dropped = warm_up(bench)
    reps, orders, loads = [], [], []
    for r in range(args.reps):
        loads.append(load_average(2))
        log(f"repetition {r + 1}/{args.reps} (load average {loads[-1]})")
        res = bench.run_rep(f"rep{r}", r)
        orders.append(sorted(res, key=lambda k: res[k]["order"]))
        reps.append(res)
    bench.close()
    if created_dir and bench.rank == 0 and not args.keep:
        with contextlib.suppress(OSError):
            os.rmdir(args.dir)  # only if empty: it was made by this run
    if bench.rank == 0:
        doc["config"] = config(bench, dropped, orders, str(device), backend)
        doc["cache"] = {"method": bench.cache.method, "note": bench.cache.note}
        doc.update(summarize(bench, reps))
        doc["errors"] = {**bench.errors, **{p: f"dropped: {e}" for p, e in dropped.items()}}
        doc["warmup"] = warm
        doc["results"] = {p: [r[p] for r in reps if p in r] for p in ALL_PHASES
                          if any(p in r for r in reps)}
        doc["notes"] = notes(bench)
        doc["wall_s"] = time.time() - started
        doc["machine"]["loadavg_at_end"] = load_average()
        doc["machine"]["loadavg_per_rep"] = loads
        write_outputs(doc, out=args.out, plot=args.plot, draw=plot)
    dist.destroy_process_group()
    return 0


def warm_up(bench: Bench) -> tuple[list[dict[str, dict[str, Any]]], dict[str, str]]:
    """The untimed repetitions, and the phases dropped because they failed in them.

    A phase that cannot work here (e.g. DCP process mode) is dropped from ``bench.args.phases``
    after its warm-up; a shardckpt phase never is (its failures are the results).
    """
    args = bench.args
    warm: list[dict[str, dict[str, Any]]] = []
    for w in range(args.warmup_reps):
        log(f"warm-up repetition {w + 1}/{args.warmup_reps} (untimed in the medians)")
        warm.append(bench.run_rep(f"warmup{w}", 0))
    dropped = {}
    for p in list(args.phases):
        errs = [r[p]["error"] for r in warm if p in r and "error" in r[p]]
        if errs and not p.startswith("shardckpt"):
            dropped[p] = errs[0]
            args.phases.remove(p)
            log(f"dropping phase {p}: failed during warm-up: {errs[0]}")
    return warm, dropped


def config(bench: Bench, dropped: dict[str, str], orders: list[list[str]], device: str,
           backend: str) -> dict[str, Any]:
    """The document's ``config``: what was measured and how."""
    args = bench.args
    return {
        "world_size": bench.world,
        "size_gb_requested": args.size_gb,
        "model": f"{bench.shape['layers']} x nn.Linear({bench.shape['width']}, "
                 f"{bench.shape['width']}), fully_shard per layer + root, fp32",
        **bench.shape,
        "optimizer": "AdamW, one step with real gradients",
        "state_bytes_total": bench.total_bytes,
        "state_bytes_per_rank": bench.all_rank_bytes,
        "reps": args.reps,
        "warmup_reps": args.warmup_reps,
        "phases": args.phases,
        "dropped_phases": dropped,
        "order_per_rep": orders,
        "compression": args.compression,
        "memory_budget_bytes": bench.budget_bytes,
        "fsync": bench.fsync,
        "shardckpt_knobs": knob_values(),
        "io_chunk_bytes": args.io_chunk_mb * MiB,
        "rss_reference_bytes": bench.rss_reference,
        "manager_held_bytes_per_rank": bench.held,
        "device": device,
        "backend": backend,
        "stream_copy": streamcopy.why_not if streamcopy.routine() is None else "available",
    }


if __name__ == "__main__":
    sys.exit(main())
