"""Rank functions for tests/test_crash_dist.py and tests/test_faults_dist.py (imported by the
spawned children of ``harness.run_ranks``, and by the tests themselves for the state helpers).

Crashes and faults are injected *in the child*, without touching production code: a stable
low-level call (``StagingPool.snapshot``, ``_LocalSink.write``, ``os.fsync``,
``LocalLocation.write_atomic``, ``LocalLocation.remove_tree``, the module-level ``open`` and
``os`` of ``shardckpt.storage.local``) is wrapped so that, on the chosen rank and once the
chosen phase is reached, it SIGKILLs this rank (or every rank of the job), or raises an
``OSError`` like a failing disk would.

The state saved at a step depends only on the step (``full_tensors``), so the parent can check
what any surviving checkpoint holds, at any world size, without a word from the dead children.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

import shardckpt
from shardckpt.engine import snapshot as snapshot_mod
from shardckpt.storage import direct as direct_mod
from shardckpt.storage import local as location_mod
from shardckpt.storage import localsink as localsink_mod

MANIFEST = "manifest.json"
RETENTION_THREAD = "shardckpt-retention"  # thread name prefix of the manager's retention runner


# ------------------------------------------------------------------------------ fast rank start
@contextlib.contextmanager
def forked_ranks() -> Iterator[None]:
    """Within this context, ``harness.run_ranks`` starts its ranks from a fork server that has
    torch, shardckpt and this module imported already (multiprocessing's "forkserver" start
    method instead of "spawn"): a fresh process per rank as before, with everything the
    harness does (own session, environment, process group, reaping), in a tenth of the time.
    The server is a fresh interpreter (not a fork of pytest); it exits with the test process.
    """
    import multiprocessing
    from types import SimpleNamespace

    import harness

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch.distributed.tensor", "shardckpt.manager",
                                "shardckpt.cli.main"])
    real = harness.multiprocessing
    harness.multiprocessing = SimpleNamespace(get_context=lambda method="spawn": ctx)
    try:
        yield
    finally:
        harness.multiprocessing = real


# ------------------------------------------------------------------------------ the saved state
def full_tensors(step: int) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors saved at ``step``: a function of the step alone."""
    g = torch.Generator().manual_seed(5000 + step)
    return {
        "w": torch.randn(64, 48, generator=g),  # sharded by rows
        "emb": torch.randn(37, 16, generator=g).to(torch.bfloat16),  # sharded, unevenly
        "bias": torch.randn(300, generator=g, dtype=torch.float64),  # replicated
        "ids": torch.randint(-(2**62), 2**62, (129,), generator=g, dtype=torch.int64),
    }


SHARDED = ("w", "emb")


def rank_state(step: int, mesh: Any = None) -> dict[str, Any]:
    """What a rank passes to ``save`` at ``step``: DTensors sharded over ``mesh`` (rows split
    over the ranks, so every rank writes data of its own) plus replicated tensors; plain
    tensors in a single process (``mesh`` None)."""
    full = full_tensors(step)
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        for key in SHARDED:  # collective: every rank of the mesh builds the same state
            full[key] = distribute_tensor(full[key], mesh, [Shard(0)])
    return {"model": full, "step": step}


def blank_state(mesh: Any = None) -> dict[str, Any]:
    """A state of the right shapes and placements, all zeros, to load into."""
    state = rank_state(0, mesh)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    state["step"] = -1
    return state


def _bits(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.contiguous().reshape(-1).view(torch.uint8)


def state_problems(got: dict[str, Any], step: int, mesh: Any = None) -> list[str]:
    """How ``got`` (loaded) differs from what was saved at ``step``; [] when bit-identical
    (each rank compares its own shards)."""
    want = rank_state(step, mesh)
    problems = [] if got["step"] == step else [f"step field {got['step']} != {step}"]
    for key, w in want["model"].items():
        g = got["model"][key]
        if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(_bits(g), _bits(w)):
            problems.append(f"model/{key} differs from step {step}")
    return problems


def _mesh(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _job_pids(world: int) -> list[int]:
    """Every rank's pid, in rank order (each rank runs in its own session: see the harness)."""
    mine = torch.tensor([os.getpid()], dtype=torch.int64)
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


def _die(pids: list[int]) -> None:
    """SIGKILL the other ``pids`` (if any), then this process. Nothing after this runs."""
    for pid in pids:
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# ------------------------------------------------------------------------------ kill at a phase
PHASES = ("snapshot", "writing", "fsync", "commit", "committed", "retention")


def arm_kill(phase: str, pids: list[int], step: int) -> None:
    """From now on, kill ``pids`` (this rank, or the whole job) when this rank reaches
    ``phase`` of the save of ``step``:

    * ``snapshot``: ``save`` starts copying the state into its staging buffers;
    * ``writing``: a ``.shard`` file of this rank has had some of its bytes written (flushed
      to the file, so the partial shard is really there);
    * ``fsync``: this rank fsyncs one of its ``.shard`` files;
    * ``commit``: rank 0 is about to write ``manifest.json`` (every shard is durable);
    * ``committed``: rank 0 has just renamed ``manifest.json`` into place (and fsynced the
      step directory), before the root is fsynced and before any rank hears of the outcome;
    * ``retention``: retention after the commit has removed an old step's manifest and is
      deleting its data.
    """
    step_dir = f"step-{step:010d}"
    sink_cls, loc_cls = location_mod._LocalSink, location_mod.LocalLocation
    if phase == "snapshot":
        real_snapshot = snapshot_mod.StagingPool.snapshot

        def snapshot(self: Any, collected: Any, *args: Any) -> Any:
            _die(pids)
            return real_snapshot(self, collected, *args)

        snapshot_mod.StagingPool.snapshot = snapshot  # type: ignore[method-assign]
    elif phase == "writing":
        real_write = sink_cls.write
        calls = [0]

        def write(self: Any, data: Any) -> int:
            n = real_write(self, data)
            if self.path.endswith(".shard") and f"/{step_dir}/" in self.path:
                calls[0] += 1
                if calls[0] == 2:  # the preamble and some data are in: make them real
                    self._f.flush()
                    _die(pids)
            return n

        sink_cls.write = write  # type: ignore[method-assign]
    elif phase == "fsync":
        real_fsync = os.fsync

        def fsync(fd: Any) -> None:
            path = _fd_path(fd) if isinstance(fd, int) else ""
            if path.endswith(".shard") and f"/{step_dir}/" in path:
                _die(pids)
            real_fsync(fd)

        os.fsync = fsync  # os is shared: location.py's os.fsync is this one
    elif phase in ("commit", "committed"):
        real_atomic = loc_cls.write_atomic

        def write_atomic(self: Any, relpath: str, data: bytes) -> None:
            mine = relpath == f"{step_dir}/{MANIFEST}"
            if mine and phase == "commit":
                _die(pids)
            real_atomic(self, relpath, data)
            if mine:
                _die(pids)

        loc_cls.write_atomic = write_atomic  # type: ignore[method-assign]
    elif phase == "retention":
        real_remove_tree = loc_cls.remove_tree

        def remove_tree(self: Any, reldir: str) -> None:
            if threading.current_thread().name.startswith(RETENTION_THREAD):
                _die(pids)
            real_remove_tree(self, reldir)

        loc_cls.remove_tree = remove_tree  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown phase {phase!r}")


def crash_at_phase(rank: int, world: int, root: str, phase: str, victim: int,
                   whole_job: bool) -> dict[str, Any]:
    """Save steps 1 and 2 (async), then step 3 with a kill armed on rank ``victim`` at
    ``phase``: that rank alone dies, or (``whole_job``) it kills every rank of the job.
    Retention keeps the last 2, so committing step 3 deletes step 1 (the ``retention`` phase).
    Returns only on ranks that survive; a survivor raises whatever its save raised."""
    mesh = _mesh(world)
    pids = _job_pids(world)
    mgr = shardckpt.CheckpointManager(root, retention=shardckpt.RetentionPolicy(keep_last=2))
    for step in (1, 2):
        mgr.save(step, rank_state(step, mesh)).wait()
    state = rank_state(3, mesh)
    if rank == victim:
        arm_kill(phase, pids if whole_job else [os.getpid()], 3)
    handle = mgr.save(3, state)
    info = handle.wait()
    mgr.close()
    return {"committed": info.step if info is not None else None, "steps": mgr.steps()}


def kill_at_random(rank: int, world: int, root: str, seed: int, log_path: str,
                   max_delay: float) -> None:
    """Train-and-save-every-step (async saves, keep-last-3 retention) until rank 0, after a
    delay drawn from ``random.Random(seed)``, SIGKILLs every rank of the job at once, wherever
    they are. Rank 0 appends to ``log_path`` each step whose save it saw succeed."""
    mesh = _mesh(world)
    pids = _job_pids(world)
    mgr = shardckpt.CheckpointManager(root, retention=shardckpt.RetentionPolicy(keep_last=3))
    mgr.save(1, rank_state(1, mesh)).wait()
    log = open(log_path, "a", buffering=1) if rank == 0 else None
    if log is not None:
        log.write("1\n")
        delay = random.Random(seed).uniform(0.0, max_delay)
        killer = threading.Timer(delay, _die, args=(pids,))
        killer.daemon = True
        killer.start()
    prev = None
    for step in range(2, 100_000):
        state = rank_state(step, mesh)  # the "training step": new values for every tensor
        handle = mgr.save(step, state)  # waits for the previous save first
        if prev is not None and log is not None:
            prev.wait()  # already finished: it succeeded
            log.write(f"{prev.step}\n")
        prev = handle
    raise AssertionError("the job was never killed")


def recover(rank: int, world: int, roots: list[str]) -> list[dict[str, Any]]:
    """The next job on each crashed root: load the latest checkpoint (and check it bit for bit),
    save the step after it, and apply retention; report what it saw."""
    mesh = _mesh(world)
    out = []
    for root in roots:
        with shardckpt.CheckpointManager(
                root, retention=shardckpt.RetentionPolicy(keep_last=3)) as mgr:
            before = mgr.steps()
            state = blank_state(mesh)
            latest = mgr.load(state)
            problems = state_problems(state, latest, mesh)
            nxt = latest + 1
            info = mgr.save(nxt, rank_state(nxt, mesh)).wait()
            report = mgr.prune()
            out.append({"before": before, "latest": latest, "problems": problems,
                        "saved": info.step if info is not None else None,
                        "deleted": list(report.deleted), "after": mgr.steps()})
    return out


# ------------------------------------------------------------------------------ I/O faults
class _FaultyRaw(io.FileIO):
    """A raw file whose ``write`` can fail (under the real ``BufferedWriter``, so the error
    surfaces where a failing ``write(2)`` would)."""

    faults: Faults

    def write(self, b: Any) -> int:  # type: ignore[override]
        self.faults.check("write", self.name if isinstance(self.name, str) else "")
        return super().write(b)


class _OsProxy:
    """``os`` for ``shardckpt.storage.local``, with ``fsync`` and ``replace`` checked."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    def fsync(self, fd: int) -> None:
        self._faults.check("fsync", _fd_path(fd))
        os.fsync(fd)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:  # direct and packed writes
        self._faults.check("write", _fd_path(fd))
        return os.pwrite(fd, data, offset)

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        self._faults.check("replace", os.fspath(dst))
        os.replace(src, dst, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


class Faults:
    """Fails ``op`` ("write", "fsync", "replace") with ``err`` on paths that ``match`` accepts,
    once armed, in this process only. Installed into ``shardckpt.storage.local``."""

    def __init__(self) -> None:
        self.op: str | None = None
        self.match: Callable[[str], bool] = lambda p: False
        self.err = errno.EIO
        self.fired = 0
        self._lock = threading.Lock()
        for mod in (location_mod, localsink_mod, direct_mod):  # where local files are written
            mod.os = _OsProxy(self)  # type: ignore[attr-defined]
            mod.open = self._open  # type: ignore[attr-defined]

    def arm(self, op: str, match: Callable[[str], bool], err: int) -> None:
        self.op, self.match, self.err, self.fired = op, match, err, 0

    def disarm(self) -> None:
        self.op, self.fired = None, 0

    def check(self, op: str, path: str) -> None:
        with self._lock:
            if op != self.op or not self.match(path):
                return
            self.fired += 1
        raise OSError(self.err, os.strerror(self.err) + " (injected)")

    def _open(self, file: Any, mode: str = "r", buffering: int = -1, *args: Any,
              **kwargs: Any) -> Any:
        if mode != "xb" or args or kwargs or not isinstance(file, str):
            return open(file, mode, buffering, *args, **kwargs)
        raw = _FaultyRaw(file, "xb")
        raw.faults = self
        return io.BufferedWriter(raw, buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE)


def _shard_of(step: int) -> Callable[[str], bool]:
    return lambda p: p.endswith(".shard") and f"/step-{step:010d}/" in p


def _manifest_of(step: int) -> Callable[[str], bool]:
    return lambda p: p.endswith(f"/step-{step:010d}/{MANIFEST}")


def _manifest_tmp_of(step: int) -> Callable[[str], bool]:
    return lambda p: f"/step-{step:010d}/{MANIFEST}.tmp-" in p


# (name, faulty rank, op, path predicate for the step, errno, blocking save)
FAULTS: list[tuple[str, int, str, Callable[[int], Callable[[str], bool]], str, bool]] = [
    ("rank1-shard-write-ENOSPC-async", 1, "write", _shard_of, "ENOSPC", False),
    ("rank1-shard-fsync-EIO-blocking", 1, "fsync", _shard_of, "EIO", True),
    ("rank0-shard-write-EIO-blocking", 0, "write", _shard_of, "EIO", True),
    ("rank0-shard-fsync-ENOSPC-async", 0, "fsync", _shard_of, "ENOSPC", False),
    ("rank0-manifest-fsync-EIO-async", 0, "fsync", _manifest_tmp_of, "EIO", False),
    ("rank0-manifest-rename-ENOSPC-blocking", 0, "replace", _manifest_of, "ENOSPC", True),
]


def faults_on_one_rank(rank: int, world: int, root: str) -> list[dict[str, Any]]:
    """For each entry of ``FAULTS``: the save of a new step fails (the fault is on one rank
    only), training goes on (the next step's state differs), and the same step saved again
    with the fault gone succeeds. Reports, per case, what this rank saw."""
    mesh = _mesh(world)
    faults = Faults()
    mgr = shardckpt.CheckpointManager(root)
    mgr.save(1, rank_state(1, mesh)).wait()
    step = 2
    out = []
    for name, bad_rank, op, match, err, blocking in FAULTS:
        rec: dict[str, Any] = {"case": name, "step": step}
        if rank == bad_rank:
            faults.arm(op, match(step), getattr(errno, err))
        try:
            mgr.save(step, rank_state(step, mesh), blocking=blocking).wait()
            rec["error"] = None
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["shardckpt_error"] = isinstance(exc, shardckpt.ShardckptError)
        rec["fired"] = faults.fired
        faults.disarm()
        mgr.wait()  # the error was reported once, by the handle
        rec["steps_after_failure"] = mgr.steps()
        # Training goes on: the next save (same step, new values, no fault) succeeds.
        info = mgr.save(step, rank_state(step, mesh), blocking=blocking).wait()
        rec["resaved"] = info.step if info is not None else None
        rec["steps"] = mgr.steps()
        out.append(rec)
        step += 1
    blank = blank_state(mesh)
    loaded = mgr.load(blank)
    out.append({"loaded": loaded, "problems": state_problems(blank, loaded, mesh)})
    mgr.close()
    return out
