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
import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import shardckpt
from shardckpt import knobs

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SAVE_PHASES = ("memcpy", "raw_write", "shardckpt_async", "shardckpt_blocking", "dcp_save",
               "dcp_async_save", "dcp_async_save_process")
LOAD_PHASES = ("raw_read", "shardckpt_load", "dcp_load")
ALL_PHASES = SAVE_PHASES + LOAD_PHASES
ASYNC_PHASES = ("shardckpt_async", "dcp_async_save", "dcp_async_save_process")

RANK = int(os.environ.get("RANK", "0"))
_STDOUT_FD: int | None = None


def log(msg: str, all_ranks: bool = False) -> None:
    if RANK == 0 or all_ranks:
        print(f"[bench r{RANK} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def capture_stdout() -> None:
    """Keep the real stdout for the JSON; send whatever else writes to fd 1 to stderr."""
    global _STDOUT_FD
    sys.stdout.flush()
    _STDOUT_FD = os.dup(1)
    os.dup2(2, 1)


def emit_stdout(text: str) -> None:
    fd = _STDOUT_FD if _STDOUT_FD is not None else 1
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


# ------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.6,
                   help="total fp32 state (params + exp_avg + exp_avg_sq) over all ranks, 1e9 B")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions")
    p.add_argument("--warmup-reps", type=int, default=1,
                   help="untimed repetitions of every phase first (first-call costs; reported)")
    p.add_argument("--dir", default="/work/bench_tmp", help="where checkpoints are written")
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


# ------------------------------------------------------------------------------------- machine
def git_info() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line for line in run("git", "status", "--porcelain", "--", "shardckpt").splitlines()
             if line]
    diff = run("git", "diff", "HEAD", "--", "shardckpt")
    return {
        "commit": run("git", "rev-parse", "--short", "HEAD") or None,
        "package_dirty_files": dirty,
        "package_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        "note": ("figures are for this commit plus the uncommitted package changes listed"
                 if dirty else "figures are for this commit, package tree clean"),
    }


def mount_of(path: str) -> dict[str, Any]:
    real = os.path.realpath(path)
    best: dict[str, Any] = {"mount_point": None, "fstype": None, "device": None}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mount_point"] or ""):
                    best = {"mount_point": mnt, "fstype": fstype, "device": dev,
                            "options": opts}
    except OSError:
        pass
    usage = shutil.disk_usage(real)
    best["free_bytes"] = usage.free
    return best


def machine_info(args: argparse.Namespace, dirpath: str) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "ram_bytes": vm.total,
        "torch": torch.__version__,
        "torch_threads_per_rank": torch.get_num_threads(),
        "shardckpt": shardckpt.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "disk_path": os.path.realpath(dirpath),
        "disk": mount_of(dirpath),
        "fsync": not args.no_fsync,
        "loadavg_at_start": list(os.getloadavg()),
    }
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


# ------------------------------------------------------------------------------------- model
def build(size_gb: float, width: int | None, device: torch.device) -> tuple[nn.Module,
                                                                             torch.optim.Optimizer,
                                                                             dict[str, Any]]:
    target = size_gb * 1e9
    if width is None:
        width = 4096 if target >= 4 * 12 * 4096 * 4097 else 2048 if target >= 2 * 12 * 2048 * 2049 \
            else 1024
    layers = max(1, round(target / (12 * (width * width + width))))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, width, device=device)
    model(x).float().pow(2).mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim, {"width": width, "layers": layers,
                          "params": layers * (width * width + width)}


def local_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """This rank's tensors of the state (local shards of DTensors), in a stable order."""
    out: list[tuple[str, torch.Tensor]] = []
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out.append((f"model.{n}", _local(p.detach())))
    for group in optim.param_groups:
        for p in group["params"]:
            for k, v in sorted(optim.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    out.append((f"optim.{names[id(p)]}.{k}", _local(v)))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> list[float]:
    return [float(t.detach().double().sum()) + float(t.detach().double().abs().sum()) * 1e-3
            for _, t in tensors]


class HostBuffers:
    """One flat CPU byte buffer holding every local tensor (64-byte aligned views into it)."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], pin: bool) -> None:
        offsets, off = [], 0
        for _, t in tensors:
            offsets.append(off)
            off += (nbytes(t) + 63) // 64 * 64
        self.nbytes = sum(nbytes(t) for _, t in tensors)
        self.flat = torch.empty(off, dtype=torch.uint8, pin_memory=pin)
        self.flat.zero_()  # fault the pages in now, not inside a timed phase
        self.views = {}
        self.spans = []
        for (name, t), o in zip(tensors, offsets):
            n = nbytes(t)
            self.views[name] = self.flat[o:o + n].view(t.dtype).view(t.shape)
            self.spans.append((o, n))
        self.mv = memoryview(self.flat.numpy())

    def copy_from(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.views[name].copy_(t, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- RSS
class RssSampler:
    """Peak RSS of this process (and separately its children) while the block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.before = self.peak = self.children_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: list[psutil.Process] = []
        self.samples = 0

    def _sample(self) -> None:
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        if self.samples % 20 == 0:
            with contextlib.suppress(psutil.Error):
                self._children = self.proc.children(recursive=True)
        child = 0
        for c in self._children:
            with contextlib.suppress(psutil.Error):
                child += c.memory_info().rss
        self.children_peak = max(self.children_peak, child)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()


# ------------------------------------------------------------------------------------- page cache
def _mincore_resident(path: str) -> int:
    """Bytes of ``path`` in the page cache (mincore on a read-only mapping); -1 if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 0
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return -1
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return -1
                return sum(b & 1 for b in vec) * page
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return -1


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


class Cache:
    """Evicts files from the page cache before a read phase: drop_caches, else fadvise."""

    def __init__(self, enabled: bool) -> None:
        self.method = "none"
        self.note = "page cache not dropped (--no-drop-caches): reads may be served from memory"
        if not enabled:
            return
        if RANK == 0:
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1\n")
                self.method = "drop_caches"
            except OSError as exc:
                self.method = f"fadvise ({exc})"
        obj = [self.method]
        dist.broadcast_object_list(obj, src=0)
        self.method, why = obj[0].split(" ", 1) if " " in obj[0] else (obj[0], "")
        self.note = {
            "drop_caches": "sync + echo 1 > /proc/sys/vm/drop_caches before every read phase",
            "fadvise": f"drop_caches denied {why}; fsync + posix_fadvise(DONTNEED) on every "
                       "file to be read before every read phase (reads may be partly cached if "
                       "eviction did not take; see resident_bytes_before)",
        }[self.method]

    def evict(self, paths: list[str]) -> int:
        """Evict (rank 0 does it for the node), then return resident bytes of ``paths``."""
        if self.method == "none":
            pass
        elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
            if self.method == "drop_caches":
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1\n")
            else:
                for p in paths:
                    for f in files_under(p):
                        with contextlib.suppress(OSError):
                            fd = os.open(f, os.O_RDONLY)
                            try:
                                os.fsync(fd)
                                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            finally:
                                os.close(fd)
        dist.barrier()
        total = 0
        for p in paths:
            for f in files_under(p):
                r = _mincore_resident(f)
                if r < 0:
                    return -1
                total += r
        return total


# ------------------------------------------------------------------------------------- collectives
def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), as rows per rank."""
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [row.tolist() for row in out]


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.fsync = not args.no_fsync
        t0 = time.perf_counter()
        self.model, self.optim, self.shape = build(args.size_gb, args.width, device)
        self.state = {"model": self.model, "optim": self.optim}
        tensors = local_tensors(self.model, self.optim)
        self.rank_bytes = sum(nbytes(t) for _, t in tensors)
        self.all_rank_bytes = [int(x[0]) for x in gather_floats([float(self.rank_bytes)])]
        self.total_bytes = sum(self.all_rank_bytes)
        self.buffers = HostBuffers(tensors, pin=torch.cuda.is_available())
        self.buffers.copy_from(tensors)  # the raw phases write these real bytes
        self.reference = fingerprint(tensors)
        log(f"built {self.shape['layers']} x Linear({self.shape['width']}) FSDP2 + AdamW: "
            f"{self.total_bytes / 1e9:.3f} GB of state ({self.all_rank_bytes} B per rank) "
            f"in {time.perf_counter() - t0:.1f} s")
        if args.budget_mb is not None:
            os.environ[knobs.MEMORY_BUDGET.env] = f"{args.budget_mb}M"
        if args.no_fsync:
            os.environ[knobs.FSYNC.env] = "0"
        self.budget_bytes = knobs.MEMORY_BUDGET.get()
        root = [None]
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"shardckpt-bench-{stamp}-{os.getpid()}"
            root = [os.path.join(os.path.abspath(args.dir), name)]
            os.makedirs(root[0], exist_ok=False)
        dist.broadcast_object_list(root, src=0)
        self.root: str = root[0]  # type: ignore[assignment]
        self.cache = Cache(enabled=not args.no_drop_caches
                           and any(p in LOAD_PHASES for p in args.phases))
        self.proc = psutil.Process()
        gc_collect()
        dist.barrier()
        # RSS with the live state and the memcpy buffers, before any checkpointing object exists:
        # the reference for "what async save holds beyond the training process".
        self.rss_reference = self.proc.memory_info().rss
        self.mgr = shardckpt.CheckpointManager(os.path.join(self.root, "shardckpt"),
                                               async_save=True, compression=args.compression)
        self.step = 0
        self.held: list[int] | None = None  # per rank: bytes the manager keeps between saves
        self.errors: dict[str, str] = {}
        self.rep_dir = ""
        self.sources: dict[str, Any] = {}

    # -------------------------------------------------------------------- helpers
    def next_step(self) -> int:
        self.step += 1
        return self.step

    def dcp_sd(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def dcp_kwargs(self, path: str) -> dict[str, Any]:
        if self.fsync:  # the plain default call: FileSystemWriter(path), sync_files=True
            return {"checkpoint_id": path}
        return {"checkpoint_id": path,
                "storage_writer": dcp.FileSystemWriter(path, sync_files=False)}

    def raw_path(self, tag: str) -> str:
        d = os.path.join(self.rep_dir, tag)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"rank{self.rank:05d}.bin")

    def raw_write_file(self, path: str) -> None:
        chunk = self.args.io_chunk_mb * MiB
        mv = self.buffers.mv
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for o, n in self.buffers.spans:
                end = o + n
                while o < end:
                    o += os.write(fd, mv[o:min(end, o + chunk)])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.fsync:
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def raw_read_file(self, path: str) -> None:
        chunk = self.args.io_chunk_mb * MiB
        mv = self.buffers.mv
        with open(path, "rb", buffering=0) as f:
            for o, n in self.buffers.spans:
                end = o + n
                while o < end:
                    got = f.readinto(mv[o:min(end, o + chunk)])
                    if not got:
                        raise OSError(f"{path}: short read")
                    o += got

    def zero_state(self) -> None:
        with torch.no_grad():
            for _, t in local_tensors(self.model, self.optim):
                t.zero_()
        sync_device()

    def verify(self) -> bool:
        got = fingerprint(local_tensors(self.model, self.optim))
        ok = len(got) == len(self.reference) and all(
            a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(got, self.reference))
        return all(r[0] == 1.0 for r in gather_floats([1.0 if ok else 0.0]))

    def restore_if_needed(self, ok: bool) -> None:
        """After a failed load, put the true values back so later saves write real state."""
        if ok:
            return
        with torch.no_grad():
            for name, t in local_tensors(self.model, self.optim):
                if name in self.buffers.views:
                    t.copy_(self.buffers.views[name])

    # -------------------------------------------------------------------- phases
    def timed(self, name: str, fn: Callable[[], dict[str, float]], *,
              before: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run one phase on every rank between barriers; times are the max over the ranks."""
        if before is not None:
            before()
        gc_collect()
        dist.barrier()
        err = None
        times: dict[str, float] = {}
        with RssSampler() as rss:
            t0 = time.perf_counter()
            try:
                times = fn()
            except Exception as exc:  # report, keep the other phases going
                err = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed on rank {self.rank}: {traceback.format_exc()}", all_ranks=True)
            sync_device()
            times.setdefault("time_s", time.perf_counter() - t0)
        # the same keys on every rank (decided by the phase, not by what fn returned), so the
        # gather lines up even when fn failed on some ranks; missing values travel as NaN
        keys = ["time_s"] + (["stall_s"] if name in ASYNC_PHASES else []) + (
            ["get_state_dict_s"] if name.startswith("dcp_") and name != "dcp_load" else [])
        row = [float(times.get(k, float("nan"))) for k in keys] + [
            float(rss.before), float(rss.peak), float(rss.children_peak),
            float(rss.peak - self.rss_reference), 1.0 if err else 0.0]
        rows = gather_floats(row)
        out: dict[str, Any] = {}
        for i, k in enumerate(keys):
            per_rank = [r[i] if r[i] == r[i] else None for r in rows]  # NaN -> None
            finite = [v for v in per_rank if v is not None]
            out[k] = max(finite) if finite else None
            out[k + "_per_rank"] = per_rank
        out["gbps"] = self.total_bytes / 1e9 / out["time_s"] if out["time_s"] else None
        if "stall_s" in out:
            out["commit_s"] = out["time_s"]
        n = len(keys)
        out["rss"] = {
            "before_bytes_per_rank": [int(r[n]) for r in rows],
            "peak_bytes_per_rank": [int(r[n + 1]) for r in rows],
            "peak_increase_bytes_per_rank": [int(r[n + 1] - r[n]) for r in rows],
            "peak_increase_bytes": int(max(r[n + 1] - r[n] for r in rows)),
            "peak_over_reference_bytes_per_rank": [int(r[n + 3]) for r in rows],
            "peak_abs_bytes": int(max(r[n + 1] for r in rows)),
            "children_peak_bytes": int(max(r[n + 2] for r in rows)),
        }
        gc_collect()
        after = self.proc.memory_info().rss
        out["rss"]["after_trim_bytes_per_rank"] = [int(r[0]) for r in gather_floats([after])]
        if name.startswith("shardckpt_") and name != "shardckpt_load" and self.held is None:
            # the first save allocates what the manager keeps between saves (staging buffers):
            # RSS after it minus RSS before it, both after malloc_trim
            self.held = [int(r[0]) for r in gather_floats([float(after - rss.before)])]
            out["rss"]["first_save"] = True
        failed = [i for i, r in enumerate(rows) if r[-1]]
        if failed:
            out["gbps"] = None
            out["error"] = err or f"failed on rank(s) {failed}"
            out["failed_ranks"] = failed
            self.errors.setdefault(name, out["error"])
        dist.barrier()
        return out

    def load_phase(self, name: str, source: Callable[[], Any],
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
                log(f"{name}: making its source failed: {traceback.format_exc()}",
                    all_ranks=True)
            # every rank calls evict (it holds a barrier), with or without a source
            box["resident"] = self.cache.evict(paths(box["src"]) if "src" in box else [])
            if verify:
                self.zero_state()

        def fn() -> dict[str, float]:
            if "error" in box:
                raise box["error"]
            load(box["src"])
            return {}
        res = self.timed(name, fn, before=before)
        res["resident_bytes_before"] = box["resident"]
        if isinstance(box.get("src"), int):
            res["step"] = box["src"]
        if verify:
            res["verified"] = self.verify()
            self.restore_if_needed(res["verified"])
            if not res["verified"]:
                self.errors.setdefault(name, "loaded values differ from the saved ones")
        return res

    def run_phase(self, name: str) -> dict[str, Any]:
        if name == "memcpy":
            def fn() -> dict[str, float]:
                self.buffers.copy_from(local_tensors(self.model, self.optim))
                return {}
            return self.timed(name, fn)

        if name == "raw_write":
            path = self.raw_path("raw_write")
            self.sources["raw"] = os.path.dirname(path)
            return self.timed(name, lambda: (self.raw_write_file(path), {})[1])

        if name in ("shardckpt_async", "shardckpt_blocking"):
            step = self.next_step()

            def fn() -> dict[str, float]:
                t0 = time.perf_counter()
                if name == "shardckpt_async":
                    h = self.mgr.save(step, self.state)
                    t1 = time.perf_counter()
                    h.wait()
                    return {"stall_s": t1 - t0, "time_s": time.perf_counter() - t0}
                self.mgr.save(step, self.state, blocking=True)
                return {"time_s": time.perf_counter() - t0}
            res = self.timed(name, fn)
            res["step"] = step
            if "error" not in res:
                self.sources.setdefault("shardckpt", []).append(step)
            return res

        if name in ("dcp_save", "dcp_async_save", "dcp_async_save_process"):
            path = os.path.join(self.rep_dir, name)

            def fn() -> dict[str, float]:
                t0 = time.perf_counter()
                sd = self.dcp_sd()
                t_sd = time.perf_counter() - t0
                if name == "dcp_save":
                    dcp.save(sd, **self.dcp_kwargs(path))
                    return {"time_s": time.perf_counter() - t0, "get_state_dict_s": t_sd}
                kw = self.dcp_kwargs(path)
                stager = None
                if "storage_writer" in kw:
                    # a FileSystemWriter passed alone would also become the stager (its older,
                    # slower staging path); keep the stager the default call would make
                    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
                    stager = DefaultStager(StagingOptions(False, False, False, False))
                    kw["async_stager"] = stager
                if name == "dcp_async_save_process":
                    from torch.distributed.checkpoint.state_dict_saver import (
                        AsyncCheckpointerType,
                    )
                    kw["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
                fut = dcp.async_save(sd, **kw)
                t1 = time.perf_counter()
                fut.result()
                if stager is not None:
                    stager.close()
                return {"stall_s": t1 - t0, "time_s": time.perf_counter() - t0,
                        "get_state_dict_s": t_sd}
            res = self.timed(name, fn)
            if "error" not in res:
                self.sources.setdefault("dcp", []).append(path)
            return res

        if name == "raw_read":
            def source() -> str:  # raw_write's file, or one written now (untimed)
                if "raw" not in self.sources:
                    path = self.raw_path("raw_src")
                    self.raw_write_file(path)
                    self.sources["raw"] = os.path.dirname(path)
                return self.sources["raw"]

            def read(src: str) -> None:
                self.raw_read_file(os.path.join(src, f"rank{self.rank:05d}.bin"))
            return self.load_phase(name, source, lambda src: [src], read, verify=False)

        if name == "shardckpt_load":
            def source() -> int:  # the step this repetition saved last, or one saved now
                if not self.sources.get("shardckpt"):
                    step = self.next_step()
                    self.mgr.save(step, self.state, blocking=True)
                    self.sources["shardckpt"] = [step]
                return self.sources["shardckpt"][-1]

            def load(step: int) -> None:
                got = self.mgr.load(self.state, step=step)
                if got != step:
                    raise RuntimeError(f"load returned step {got}, asked for {step}")
            return self.load_phase(
                name, source,
                lambda step: [os.path.join(self.root, "shardckpt", f"step-{step:010d}")],
                load, verify=True)

        if name == "dcp_load":
            def source() -> str:  # dcp_save's directory, or one saved now
                if not self.sources.get("dcp"):
                    path = os.path.join(self.rep_dir, "dcp_src")
                    dcp.save(self.dcp_sd(), **self.dcp_kwargs(path))
                    self.sources["dcp"] = [path]
                return self.sources["dcp"][0]

            def load(path: str) -> None:
                sd = self.dcp_sd()
                dcp.load(sd, checkpoint_id=path)
                set_state_dict(self.model, self.optim, model_state_dict=sd["model"],
                               optim_state_dict=sd["optim"])
            return self.load_phase(name, source, lambda path: [path], load, verify=True)
        raise ValueError(name)

    def run_rep(self, label: str, rotation: int) -> dict[str, dict[str, Any]]:
        self.rep_dir = os.path.join(self.root, label)
        if self.rank == 0:
            os.makedirs(self.rep_dir, exist_ok=True)
        dist.barrier()
        self.sources = {}
        saves = [p for p in SAVE_PHASES if p in self.args.phases]
        loads = [p for p in LOAD_PHASES if p in self.args.phases]
        order = rotate(saves, rotation) + rotate(loads, rotation)
        results: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(order):
            res = self.run_phase(name)
            res["order"] = i
            results[name] = res
            extra = f" stall {res['stall_s']:.3f} s" if res.get("stall_s") is not None else ""
            log(f"{label} {name}: {res['time_s']:.3f} s ({res['gbps'] or 0:.2f} GB/s){extra}"
                f" rss +{res['rss']['peak_increase_bytes'] / 1e6:.0f} MB"
                + (f" ERROR {res['error']}" if "error" in res else ""))
        self.cleanup_rep()
        return results

    def cleanup_rep(self) -> None:
        dist.barrier()
        if self.rank == 0 and not self.args.keep:
            shutil.rmtree(self.rep_dir, ignore_errors=True)
            for step in self.sources.get("shardckpt", []):
                shutil.rmtree(os.path.join(self.root, "shardckpt", f"step-{step:010d}"),
                              ignore_errors=True)
        dist.barrier()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mgr.close()
        dist.barrier()
        if self.rank == 0 and not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        dist.barrier()


def rotate(xs: list[str], k: int) -> list[str]:
    if not xs:
        return xs
    k %= len(xs)
    return xs[k:] + xs[:k]


def gc_collect() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so a
    phase's RSS is not hidden in, nor inflated by, pages an earlier phase freed but kept."""
    import gc

    gc.collect()
    if _LIBC is not None:
        with contextlib.suppress(AttributeError, OSError):
            _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


# ------------------------------------------------------------------------------------- summary
def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(bench: Bench, reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {}
    phases = [p for p in ALL_PHASES if any(p in r for r in reps)]
    for p in phases:
        ok = [r[p] for r in reps if p in r and "error" not in r[p]]
        if not ok:
            medians[p] = {"error": bench.errors.get(p, "no successful repetition")}
            continue
        m: dict[str, Any] = {"time_s": median([x["time_s"] for x in ok]), "n": len(ok)}
        m["gbps"] = bench.total_bytes / 1e9 / m["time_s"] if m["time_s"] else None
        if p in ASYNC_PHASES:
            m["stall_s"] = median([x["stall_s"] for x in ok])
            m["commit_s"] = m["time_s"]
        if p.startswith("dcp_") and "get_state_dict_s" in ok[0]:
            m["get_state_dict_s"] = median([x.get("get_state_dict_s") for x in ok])
        m["rss_peak_increase_bytes"] = median([x["rss"]["peak_increase_bytes"] for x in ok])
        m["rss_peak_abs_bytes"] = median([x["rss"]["peak_abs_bytes"] for x in ok])
        m["rss_peak_over_reference_bytes"] = median(
            [max(x["rss"]["peak_over_reference_bytes_per_rank"]) for x in ok])
        if "resident_bytes_before" in ok[0]:
            m["resident_bytes_before"] = max(x["resident_bytes_before"] for x in ok)
        if "verified" in ok[0]:
            m["verified"] = all(x["verified"] for x in ok)
        medians[p] = m

    def med(p: str, k: str) -> float | None:
        return medians.get(p, {}).get(k)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def paired(fa: Callable[[dict], float | None], fb: Callable[[dict], float | None],
               pa: str, pb: str) -> list[float | None]:
        out = []
        for r in reps:
            if pa in r and pb in r and "error" not in r[pa] and "error" not in r[pb]:
                out.append(ratio(fa(r[pa]), fb(r[pb])))
        return out

    def t(x: dict) -> float:
        return x["time_s"]

    def s(x: dict) -> float:
        return x["stall_s"]

    budget_ratio_per_rep = []
    held = bench.held or [0] * bench.world
    for r in reps:
        x = r.get("shardckpt_async")
        if x and "error" not in x:
            # what the manager holds between saves + what this save added on top of that
            extra = [inc + (0 if x["rss"].get("first_save") else h) for inc, h in
                     zip(x["rss"]["peak_increase_bytes_per_rank"], held)]
            x["rss"]["async_save_footprint_bytes_per_rank"] = extra
            budget_ratio_per_rep.append(max(
                e / (rb + bench.budget_bytes) for e, rb in zip(extra, bench.all_rank_bytes)))
    spec = [
        # name, value (ratio of medians), per-rep paired ratios, how read
        ("async_stall_over_dcp_async_stall",
         ratio(med("shardckpt_async", "stall_s"), med("dcp_async_save", "stall_s")),
         paired(s, s, "shardckpt_async", "dcp_async_save"),
         "shardckpt async stall / dcp.async_save (thread) stall; lower is better"),
        ("async_stall_over_dcp_async_process_stall",
         ratio(med("shardckpt_async", "stall_s"), med("dcp_async_save_process", "stall_s")),
         paired(s, s, "shardckpt_async", "dcp_async_save_process"),
         "shardckpt async stall / dcp.async_save (process) stall; lower is better"),
        ("async_stall_over_memcpy",
         ratio(med("shardckpt_async", "stall_s"), med("memcpy", "time_s")),
         paired(s, t, "shardckpt_async", "memcpy"),
         "shardckpt async stall / copy into preallocated buffers; lower is better"),
        ("dcp_async_stall_over_memcpy",
         ratio(med("dcp_async_save", "stall_s"), med("memcpy", "time_s")),
         paired(s, t, "dcp_async_save", "memcpy"), "for reference"),
        ("blocking_save_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("shardckpt_blocking", "time_s")),
         paired(t, t, "raw_write", "shardckpt_blocking"),
         "shardckpt blocking save GB/s / raw fsynced write GB/s; higher is better"),
        ("blocking_save_throughput_over_dcp_save",
         ratio(med("dcp_save", "time_s"), med("shardckpt_blocking", "time_s")),
         paired(t, t, "dcp_save", "shardckpt_blocking"),
         "shardckpt blocking save GB/s / dcp.save GB/s; higher is better"),
        ("async_commit_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("shardckpt_async", "commit_s")),
         paired(t, t, "raw_write", "shardckpt_async"), "for reference"),
        ("dcp_save_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("dcp_save", "time_s")),
         paired(t, t, "raw_write", "dcp_save"), "for reference"),
        ("load_throughput_over_dcp_load",
         ratio(med("dcp_load", "time_s"), med("shardckpt_load", "time_s")),
         paired(t, t, "dcp_load", "shardckpt_load"),
         "shardckpt load GB/s / dcp.load (+ set_state_dict) GB/s; higher is better"),
        ("load_throughput_over_raw_read",
         ratio(med("raw_read", "time_s"), med("shardckpt_load", "time_s")),
         paired(t, t, "raw_read", "shardckpt_load"),
         "shardckpt load GB/s / raw read GB/s; higher is better"),
        ("async_peak_rss_over_state_plus_budget",
         median(budget_ratio_per_rep), budget_ratio_per_rep,
         "max over ranks of (bytes the manager keeps between saves, measured across its first "
         "save + peak RSS increase during this async save) / (rank state bytes + memory "
         "budget); lower is better"),
    ]
    ratios = {name: {"value": v, "per_rep": per, "meaning": how} for name, v, per, how in spec}

    def target(name: str, metric: str, op: str, thr: float, text: str) -> dict[str, Any]:
        v = ratios[metric]["value"]
        ok = None if v is None else (v <= thr if op == "<=" else v >= thr)
        return {"name": name, "metric": metric, "value": v, "op": op, "threshold": thr,
                "pass": ok, "target": text}

    targets = [
        target("async stall vs dcp.async_save", "async_stall_over_dcp_async_stall", "<=", 0.2,
               "stall <= 0.2x dcp.async_save stall"),
        target("async stall vs memcpy", "async_stall_over_memcpy", "<=", 3.0,
               "stall <= 3x a copy into preallocated buffers"),
        target("blocking save vs raw write", "blocking_save_throughput_over_raw_write", ">=", 0.9,
               "blocking save >= 0.9x raw fsynced write"),
        target("blocking save vs dcp.save", "blocking_save_throughput_over_dcp_save", ">=", 1.2,
               "blocking save >= 1.2x dcp.save"),
        target("load vs dcp.load", "load_throughput_over_dcp_load", ">=", 1.2,
               "load >= 1.2x dcp.load"),
        target("async peak RSS", "async_peak_rss_over_state_plus_budget", "<=", 1.1,
               "peak RSS during async save <= rank state + budget + 10%"),
    ]
    return {"medians": medians, "ratios": ratios, "targets": targets}


# ------------------------------------------------------------------------------------- plot
def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    palette = {"shardckpt": "#1f77b4", "dcp": "#ff7f0e", "raw": "#7f7f7f", "memcpy": "#2ca02c"}
    for p, m in doc["medians"].items():
        if "time_s" not in m:
            continue
        color = next((c for k, c in palette.items() if p.startswith(k)), "#9467bd")
        if "stall_s" in m:
            labels += [f"{p}\nstall", f"{p}\ncommit"]
            values += [m["stall_s"], m["commit_s"]]
            colors += [color, color]
        else:
            labels.append(p)
            values.append(m["time_s"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) + 4), 6.5))
    bars = ax.bar(range(len(values)), values, color=colors)
    for i, b in enumerate(bars):
        if "\nstall" in labels[i]:
            b.set_hatch("//")
        ax.annotate(f"{values[i]:.3g} s", (b.get_x() + b.get_width() / 2, values[i]),
                    ha="center", va="bottom", fontsize=8)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("median seconds (max over ranks)")
    cfg, mach = doc["config"], doc["machine"]
    ax.set_title(f"shardckpt {doc['git']['commit']}: {cfg['state_bytes_total'] / 1e9:.2f} GB "
                 f"FSDP2+AdamW, {cfg['world_size']} ranks, {cfg['reps']} reps, "
                 f"{mach['disk']['fstype']}{'' if mach['fsync'] else ' (no fsync)'}", fontsize=10)
    lines = []
    for tg in doc["targets"]:
        v = tg["value"]
        mark = "n/a" if tg["pass"] is None else ("PASS" if tg["pass"] else "FAIL")
        lines.append(f"{tg['target']}: {'-' if v is None else f'{v:.2f}x'} {mark}")
    ax.text(1.01, 1.0, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8,
            family="monospace", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    capture_stdout()
    if "RANK" not in os.environ:
        print("run under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
              "benchmarks/throughput.py ...", file=sys.stderr)
        return 64
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
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
            "machine": machine_info(args, args.dir),
        }
    warm: list[dict[str, dict[str, Any]]] = []
    for w in range(args.warmup_reps):
        log(f"warm-up repetition {w + 1}/{args.warmup_reps} (untimed in the medians)")
        warm.append(bench.run_rep(f"warmup{w}", 0))
    # a phase that cannot work here (e.g. DCP process mode) is dropped after its warm-up
    dropped = {}
    for p in list(args.phases):
        errs = [r[p]["error"] for r in warm if p in r and "error" in r[p]]
        if errs and not p.startswith("shardckpt"):
            dropped[p] = errs[0]
            args.phases.remove(p)
            log(f"dropping phase {p}: failed during warm-up: {errs[0]}")
    reps = []
    orders = []
    loads = []
    for r in range(args.reps):
        loads.append([round(x, 2) for x in os.getloadavg()])
        log(f"repetition {r + 1}/{args.reps} (load average {loads[-1]})")
        res = bench.run_rep(f"rep{r}", r)
        orders.append(sorted(res, key=lambda k: res[k]["order"]))
        reps.append(res)
    bench.close()
    if created_dir and bench.rank == 0 and not args.keep:
        with contextlib.suppress(OSError):
            os.rmdir(args.dir)  # only if empty: it was made by this run
    if bench.rank == 0:
        doc["config"] = {
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
            "device": str(device),
            "backend": "cpu:gloo,cuda:nccl" if cuda else "gloo",
        }
        doc["cache"] = {"method": bench.cache.method, "note": bench.cache.note}
        doc.update(summarize(bench, reps))
        doc["errors"] = {**bench.errors, **{p: f"dropped: {e}" for p, e in dropped.items()}}
        doc["warmup"] = warm
        doc["results"] = {p: [r[p] for r in reps if p in r] for p in ALL_PHASES
                          if any(p in r for r in reps)}
        doc["notes"] = notes(bench)
        doc["wall_s"] = time.time() - started
        doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
        doc["machine"]["loadavg_per_rep"] = loads
        text = json.dumps(doc, indent=2, default=str)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if args.plot:
            try:
                plot(doc, args.plot)
            except Exception as exc:  # a missing matplotlib must not lose the results
                log(f"plot failed: {type(exc).__name__}: {exc}")
        emit_stdout(text + "\n")
    dist.destroy_process_group()
    return 0


def knob_values() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in knobs.ALL_KNOBS:
        try:
            out[k.env] = k.get()
        except ValueError as exc:
            out[k.env] = f"invalid: {exc}"
    return out


def notes(bench: Bench) -> list[str]:
    n = [
        "time_s is the max over ranks of each rank's time between barriers; GB/s = total state "
        "bytes (all ranks, 1e9 B/GB) / time_s",
        "async phases: stall_s = time the save call blocks; commit_s = time_s = call start to "
        "committed (wait()/result() returned)",
        "dcp_* times include get_state_dict (and dcp_load includes set_state_dict), which "
        "shardckpt does inside save/load; get_state_dict_s is reported separately",
        "raw_write/raw_read move the rank's exact state bytes (copied into one flat CPU buffer) "
        "to/from one file per rank in io_chunk_bytes writes; raw_write fsyncs the file and its "
        "directory when fsync is on",
        "memcpy copies every local tensor into preallocated, pre-faulted CPU buffers (one thread "
        "per rank under torchrun's OMP_NUM_THREADS=1)",
        "loads: the state is zeroed (untimed) before each load and compared with the saved "
        "values after it (verified)",
        "rss: sampled every ~5 ms per rank; gc + malloc_trim(0) run (untimed) before and after "
        "every phase so freed heap pages neither hide nor inflate a phase's growth; "
        "peak_increase = peak during the phase - RSS just before it; peak_over_reference = "
        "peak - RSS after setup, before the CheckpointManager existed (drifts if anything "
        "leaks); manager_held_bytes = RSS growth across the manager's first save (buffers it "
        "keeps); the async target uses held + peak_increase",
        "the RSS sampler thread and the 2-core machine mean the benchmark itself competes with "
        "the background writer threads for the GIL and CPU",
    ]
    if bench.args.compression:
        n.append(f"shardckpt uses compression {bench.args.compression}; DCP writes raw bytes")
    if torch.cuda.is_available():
        n.append("CUDA: model on GPU; memcpy is device->pinned host; raw phases use host buffers "
                 "(no device transfer)")
    return n


if __name__ == "__main__":
    sys.exit(main())
