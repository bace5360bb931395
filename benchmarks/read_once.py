"""Issue 31: read-once load, measured against the issue's acceptance figures, in one run.

Two setups, each one ``torchrun --standalone`` job that this script starts itself:

- **ddp**: ``--ranks`` (4) ranks hold the same replicated state of ``--size-mb`` (256) MB, save it
  once to local files under ``--dir``, then load it with ``SHARDCKPT_READ_ONCE=1`` and ``=0``,
  interleaved over ``--reps`` (2) rounds, the page cache evicted before every load
  (``common/pagecache.py``). Targets, on every ``=1`` load: the sum over ranks of ``bytes_read``
  at most 1.1x the checkpoint's size, no rank above 0.4x, each process's ``/proc/self/io``
  ``rchar`` delta around the load within 10% of its ``bytes_read``, and every rank's values exact
  (a SHA-256 of the loaded state equal to that of the saved state, on every load of both modes).
- **s3**: ``--s3-ranks`` (2) ranks against ``moto_server`` on 127.0.0.1 (started here), the
  default ``auto`` (``SHARDCKPT_READ_ONCE`` unset) against ``=0``, interleaved. Targets: the sum of
  ``bytes_read`` at most 1.1x on every ``auto`` load, values exact, and the ``auto`` load (the
  slowest rank's time, median over rounds) no slower than the ``=0`` load of the same run. moto
  keeps objects in memory, so there is no page cache to evict.

``SHARDCKPT_READ_ONCE`` is read per load (``knobs.READ_ONCE.get()`` in ``read_once_wanted``), so
each rank sets it in ``os.environ`` right before each load; one manager serves every load.

    .venv/bin/python benchmarks/read_once.py --size-mb 256 --reps 2 --dir /work/bench_tmp \\
        --out read_once.json --plot read_once.png

One JSON document on stdout (and ``--out``), logs and the PASS/MISS lines on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SUM_MAX, RANK_MAX, RCHAR_TOL = 1.1, 0.4, 0.10
MODES = {"ddp": ("1", "0"), "s3": ("auto", "0")}
FIELDS = ("bytes_read", "bytes_received", "read_chars", "seconds", "exact", "resident_before")
TENSORS = 16


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=256, help="replicated state, MB (MiB)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved rounds per setup")
    ap.add_argument("--ranks", type=int, default=4, help="ranks of the local-files (DDP) setup")
    ap.add_argument("--s3-ranks", type=int, default=2, help="ranks of the moto setup")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the local checkpoint goes")
    ap.add_argument("--setups", default="ddp,s3", help="comma-separated subset of ddp,s3")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not evict the page cache")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun job")
    ap.add_argument("--out", default=None, help="write the JSON document here too")
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    # set by the driver for the workers it starts under torchrun
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- the ranks (under torchrun)

def build_state(size_mb: float, zero: bool = False) -> dict[str, Any]:
    """The replicated state: ``TENSORS`` float32 tensors of different sizes, ``size_mb`` MiB in
    all, the same on every rank (fixed seed)."""
    import torch

    total = int(size_mb * (1 << 20)) // 4
    weights = [1 + i for i in range(TENSORS)]
    counts = [total * w // sum(weights) for w in weights]
    counts[-1] += total - sum(counts)
    g = torch.Generator().manual_seed(31)
    model = {}
    for i, n in enumerate(counts):
        model[f"w{i:02d}"] = torch.zeros(n) if zero else torch.randn(n, generator=g)
    return {"model": model}


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over the tensors' bytes, in key order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state["model"]):
        t = state["model"][k].contiguous()
        h.update(k.encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_chars() -> int:
    """This process's ``rchar`` (bytes passed through read(2)/pread(2), files and pipes)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def set_mode(mode: str) -> None:
    """``SHARDCKPT_READ_ONCE`` for the next load; ``auto`` is the default, i.e. unset."""
    if mode == "auto":
        os.environ.pop("SHARDCKPT_READ_ONCE", None)
    else:
        os.environ["SHARDCKPT_READ_ONCE"] = mode


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import shardckpt

    from common.distributed import gather_floats, init_process_group
    from common.output import log
    from common.pagecache import PageCache
    from common.rounds import interleaved_rounds

    _, backend = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = args.worker
    options = None
    if args.endpoint:
        options = {"s3://": {"endpoint_url": args.endpoint,
                             "client_kwargs": {"region_name": "us-east-1"}}}
    state = build_state(args.size_mb)
    digest = checksum(state)
    dest = build_state(args.size_mb, zero=True)
    page = PageCache(setup == "ddp" and not args.no_drop_caches)
    with shardckpt.CheckpointManager(args.root, async_save=False, capture_rng=False,
                                     storage_options=options) as mgr:
        t0 = time.perf_counter()
        mgr.save(1, state)
        save_s = time.perf_counter() - t0
        size = mgr.manifest(1).nbytes
        log(f"{setup}: saved {size / 1e6:.1f} MB with {world} ranks in {save_s:.2f} s")
        local = [args.root] if setup == "ddp" else []

        def run(mode: str, rep: int) -> dict[str, Any]:
            for t in dest["model"].values():
                t.zero_()
            set_mode(mode)
            resident = page.evict(local) if local else 0
            dist.barrier()
            rc0, t0 = read_chars(), time.perf_counter()
            mgr.load(dest, step=1)
            seconds, rc = time.perf_counter() - t0, read_chars() - rc0
            prof = mgr.last_load_profile
            exact = checksum(dest) == digest
            rows = gather_floats([prof.get("bytes_read", -1.0), prof.get("bytes_received", -1.0),
                                  float(rc), seconds, float(exact), float(resident)])
            per_rank = [dict(zip(FIELDS, row)) for row in rows]
            for r in per_rank:
                r["exact"] = bool(r["exact"])
            slowest = max(r["seconds"] for r in per_rank)
            log(f"{setup} round {rep} READ_ONCE={mode}: {slowest:.2f} s (slowest rank), "
                f"bytes_read {[int(r['bytes_read']) for r in per_rank]}")
            return {"round": rep, "ranks": per_rank, "max_seconds": slowest}

        rounds = interleaved_rounds(list(MODES[setup]), args.reps, run)
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "setup": setup, "ranks": world, "backend": backend, "checkpoint_bytes": size,
            "state_sha256": digest,
            "save_seconds": save_s, "page_cache": page.note if local else
            "moto keeps objects in memory: no page cache to evict", "loads": rounds}))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver

def run_setup(setup: str, args: argparse.Namespace, base: Path, moto: Any) -> dict[str, Any]:
    """Run one setup's torchrun job and return its rank 0's result; ``moto`` (started, maybe not
    yet ready) serves the ``s3`` setup."""
    from common.distributed import run_torchrun
    from common.output import log

    result = base / f"{setup}.json"
    nproc = args.ranks if setup == "ddp" else args.s3_ranks
    extra: list[str] = []
    if setup == "ddp":
        root = str(base / "ddp")
    else:
        from recovery_parts.launch import worker_env

        os.environ.clear()
        os.environ.update(worker_env())  # loopback credentials, no profile or real endpoint
        moto.wait_ready()
        root = f"s3://{moto.bucket(f'readonce-{uuid.uuid4().hex[:8]}')}/ckpt"
        extra = ["--endpoint", moto.url]
    log(f"{setup}: {nproc} ranks, {args.size_mb} MB, {args.reps} rounds, root {root}")
    cmd = ["--worker", setup, "--root", root, "--result", str(result),
           "--size-mb", str(args.size_mb), "--reps", str(args.reps), *extra]
    if args.no_drop_caches:
        cmd.append("--no-drop-caches")
    run_torchrun(os.path.abspath(__file__), nproc, cmd, timeout=args.timeout)
    return json.loads(result.read_text())


def _target(name: str, ok: bool, value: Any, limit: str) -> dict[str, Any]:
    return {"name": name, "pass": bool(ok), "value": value, "limit": limit}


def summarize(res: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-mode medians and the issue's targets of one setup."""
    from common.rounds import median

    size = res["checkpoint_bytes"]
    setup, (on, off) = res["setup"], MODES[res["setup"]]
    summary: dict[str, Any] = {}
    for mode, loads in res["loads"].items():
        sums = [sum(r["bytes_read"] for r in ld["ranks"]) for ld in loads]
        summary[mode] = {
            "median_load_seconds": median([ld["max_seconds"] for ld in loads]),
            "sum_bytes_read_over_size": [s / size for s in sums],
            "max_rank_bytes_read_over_size": [max(r["bytes_read"] for r in ld["ranks"]) / size
                                              for ld in loads],
            "sum_bytes_received_over_size": [sum(r["bytes_received"] for r in ld["ranks"]) / size
                                             for ld in loads],
            # S3 bytes arrive through recv(2) on sockets, which rchar does not count
            "worst_read_chars_deviation": None if setup == "s3" else max(
                abs(r["read_chars"] - r["bytes_read"]) / max(r["bytes_read"], 1.0)
                for ld in loads for r in ld["ranks"]),
            "all_exact": all(r["exact"] for ld in loads for r in ld["ranks"]),
        }
    s_on, s_off = summary[on], summary[off]
    tag = f"{setup} ({res['ranks']} ranks) READ_ONCE={on}"
    targets = [
        _target(f"{tag}: sum of bytes_read / checkpoint, worst round",
                max(s_on["sum_bytes_read_over_size"]) <= SUM_MAX,
                round(max(s_on["sum_bytes_read_over_size"]), 4), f"<= {SUM_MAX}"),
        _target(f"{setup}: every rank's values exact (SHA-256), both modes",
                s_on["all_exact"] and s_off["all_exact"],
                s_on["all_exact"] and s_off["all_exact"], "True"),
    ]
    if setup == "ddp":
        targets += [
            _target(f"{tag}: largest rank's bytes_read / checkpoint, worst round",
                    max(s_on["max_rank_bytes_read_over_size"]) <= RANK_MAX,
                    round(max(s_on["max_rank_bytes_read_over_size"]), 4), f"<= {RANK_MAX}"),
            _target(f"{tag}: |read_chars - bytes_read| / bytes_read, worst rank and round",
                    s_on["worst_read_chars_deviation"] <= RCHAR_TOL,
                    round(s_on["worst_read_chars_deviation"], 4), f"<= {RCHAR_TOL}"),
        ]
    else:
        a, b = s_on["median_load_seconds"], s_off["median_load_seconds"]
        targets.append(_target(f"{tag}: median load seconds vs READ_ONCE={off}", a <= b,
                               {on: round(a, 3), off: round(b, 3)}, f"{on} <= {off}"))
    return summary, targets


def draw(doc: dict[str, Any], path: str) -> None:
    from common.output import pyplot

    plt = pyplot()
    setups = list(doc["setups"])
    fig, axes = plt.subplots(1, 2 * len(setups), figsize=(6 * len(setups) + 2, 4), squeeze=False)
    for i, setup in enumerate(setups):
        res = doc["setups"][setup]
        size = res["checkpoint_bytes"]
        ax = axes[0][2 * i]
        modes = list(res["loads"])
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            ranks = res["loads"][mode][0]["ranks"]
            xs = [k + (j - (len(modes) - 1) / 2) * width for k in range(len(ranks))]
            read = [r["bytes_read"] / size for r in ranks]
            ax.bar(xs, read, width, color=f"C{j}", label=f"{mode}: read")
            ax.bar(xs, [r["bytes_received"] / size for r in ranks], width, bottom=read,
                   color=f"C{j}", alpha=0.35, label=f"{mode}: received")
        if setup == "ddp":
            ax.axhline(RANK_MAX, color="grey", ls=":", lw=1, label=f"{RANK_MAX}x target")
        ax.set_xticks(range(len(ranks)))
        ax.set_ylim(0, 1.3)
        ax.set_xlabel("rank")
        ax.set_ylabel("bytes / checkpoint size (round 0)")
        ax.set_title(f"{setup}: per-rank bytes")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[0][2 * i + 1]
        for j, mode in enumerate(modes):
            ts = [ld["max_seconds"] for ld in res["loads"][mode]]
            ax.scatter([j] * len(ts), ts, color=f"C{j}", zorder=3)
            ax.bar([j], [res["summary"][mode]["median_load_seconds"]], 0.5, color=f"C{j}",
                   alpha=0.3)
        ax.set_xticks(range(len(modes)), [f"READ_ONCE={m}" for m in modes])
        ax.set_ylabel("load seconds (slowest rank)")
        ax.set_title(f"{setup}: load time ({res['ranks']} ranks)")
    fig.suptitle(f"read-once load, {doc['size_mb']} MB replicated state")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def driver(args: argparse.Namespace) -> int:
    from common.machine import git_info, machine_info
    from common.output import capture_stdout, log, write_outputs

    capture_stdout()
    setups = [s for s in args.setups.split(",") if s]
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="read-once-bench-"))
    doc: dict[str, Any] = {"benchmark": "read_once", "issue": 31, "size_mb": args.size_mb,
                           "reps": args.reps, "machine": machine_info(str(base)),
                           "git": git_info(), "setups": {}, "targets": []}
    env = dict(os.environ)
    moto = None
    if "s3" in setups:  # starts while the ddp job runs
        from recovery_parts.launch import Moto

        moto = Moto(base / "moto.log")
    try:
        for setup in setups:
            res = run_setup(setup, args, base, moto)
            os.environ.clear()
            os.environ.update(env)
            res["summary"], targets = summarize(res)
            doc["setups"][setup] = res
            doc["targets"] += targets
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(base, ignore_errors=True)
    doc["all_pass"] = all(t["pass"] for t in doc["targets"])
    write_outputs(doc, out=args.out, plot=args.plot, draw=draw)
    for t in doc["targets"]:
        log(f"{'PASS' if t['pass'] else 'MISS'} {t['name']}: {t['value']} ({t['limit']})")
    return 0


def main() -> int:
    args = parse()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
