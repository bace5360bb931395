"""Storage faults on a local disk: injected I/O errors, a real full disk, and power loss.

* **Injected faults.** ``shardckpt.storage.local`` sees a proxy of ``os`` whose ``fsync`` and
  ``replace`` fail on chosen paths (fd -> path through ``/proc/self/fd``), and an ``open`` whose
  raw file object fails ``write`` on chosen paths (under the real ``BufferedWriter``, so the error
  surfaces where a real ``write(2)`` error would). For each fault point x errno (ENOSPC, EIO) x
  (blocking, async) save: the save raises ``StorageError`` naming the file, nothing is committed,
  the earlier checkpoint loads bit for bit, and the next save (fault gone) succeeds.
* **Fsync is never retried into success**: a fault that fails only the *first* fsync of a shard
  must still fail the save (after a failed fsync the kernel may have dropped the dirty pages, so a
  second fsync that "succeeds" proves nothing).
* **A real full disk**: an 8 MiB tmpfs (root only; where ``mount`` is refused the same test runs
  against an injected 8 MiB quota instead, which fails writes with ENOSPC once the files under
  the directory would exceed it). A 20 MB save fails, and the cleanup of its partial files frees
  the space for a smaller save afterwards.
* **Power loss**: see :func:`test_power_loss_at_every_durability_call`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from incremental_helpers import zeros_like

import shardckpt
from shardckpt.format import manifest as M
from shardckpt.storage import direct as direct_mod
from shardckpt.storage import local as location_mod
from shardckpt.storage import localsink as localsink_mod

REAL_OS = os
REAL_OPEN = open


# ----------------------------------------------------------------------------- state helpers
def make_state(step: int, scale: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7000 + step)
    return {
        "model": {
            "w": torch.randn(128 * scale, 256, generator=g),
            "b": torch.randn(300, generator=g, dtype=torch.float64).to(torch.bfloat16),
        },
        "ids": torch.randint(-(2**62), 2**62, (777,), generator=g, dtype=torch.int64),
        "step": step,
    }


def assert_bit_equal(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, path
        assert got.shape == want.shape, path
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{path}: bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            assert_bit_equal(got[k], want[k], f"{path}/{k}")
    else:
        assert type(got) is type(want) and got == want, path


def check_loads(root: Path, steps: dict[int, dict[str, Any]]) -> None:
    """A fresh manager on ``root`` sees exactly ``steps`` and loads each bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped (corrupt) manifest is a failure here
        with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
            assert mgr.steps() == sorted(steps)
            for step, want in steps.items():
                got = zeros_like(want)
                assert mgr.load(got, step=step) == step
                assert_bit_equal(got, want)


def fd_path(fd: int) -> str:
    return REAL_OS.readlink(f"/proc/self/fd/{fd}")


# ----------------------------------------------------------------------------- fault injector
class _OsProxy:
    """Stands in for ``os`` inside ``shardckpt.storage.local``: everything is the real ``os``
    except ``fsync`` and ``replace``, which go through ``hooks`` first."""

    def __init__(self, fsync: Callable[[int], None], replace: Callable[..., None],
                 pwrite: Callable[..., int] | None = None) -> None:
        self.fsync = fsync
        self.replace = replace
        if pwrite is not None:  # direct and packed writes of shard files (storage/localsink)
            self.pwrite = pwrite

    def __getattr__(self, name: str) -> Any:
        return getattr(REAL_OS, name)


class _FaultyRaw(io.FileIO):
    """A raw file whose ``write`` asks the injector first (BufferedWriter calls it)."""

    injector: Injector

    def write(self, b: Any) -> int:  # type: ignore[override]
        self.injector.check("write", self.name if isinstance(self.name, str) else "", len(b))
        return super().write(b)


class Injector:
    """Fails ``op`` ("write", "fsync", "replace") on paths that ``match`` accepts.

    ``times``: how many matching calls fail (None: all). ``quota``: instead of a fixed fault,
    fail writes with ENOSPC once the files under ``quota_dir`` would exceed ``quota`` bytes.
    """

    def __init__(self, base: Path) -> None:
        self.base = str(base)
        self.op: str | None = None
        self.match: Callable[[str], bool] = lambda p: False
        self.err = errno.EIO
        self.times: int | None = None
        self.quota: int | None = None
        self.fired = 0
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def arm(self, op: str, match: Callable[[str], bool], err: int,
            times: int | None = None) -> None:
        self.op, self.match, self.err, self.times, self.fired = op, match, err, times, 0

    def disarm(self) -> None:
        self.op, self.quota = None, None

    def check(self, op: str, path: str, nbytes: int = 0) -> None:
        if not path.startswith(self.base):
            return
        with self.lock:
            self.calls.append((op, path))
            if op == "write" and self.quota is not None:
                used = sum(p.stat().st_size for p in Path(self.base).rglob("*") if p.is_file())
                if used + nbytes > self.quota:
                    self.fired += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (quota)")
            if op != self.op or not self.match(path):
                return
            if self.times is not None and self.fired >= self.times:
                return
            self.fired += 1
        raise OSError(self.err, os.strerror(self.err) + " (injected)")

    def fsync(self, fd: int) -> None:
        self.check("fsync", fd_path(fd))
        REAL_OS.fsync(fd)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.check("write", fd_path(fd), len(data))
        return REAL_OS.pwrite(fd, data, offset)

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        self.check("replace", os.fspath(dst))
        REAL_OS.replace(src, dst, *args, **kwargs)

    def open(self, file: Any, mode: str = "r", buffering: int = -1, *args: Any,
             **kwargs: Any) -> Any:
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if mode != "xb" or args or kwargs or not str(path).startswith(self.base):
            return REAL_OPEN(file, mode, buffering, *args, **kwargs)
        raw = _FaultyRaw(path, "xb")
        raw.injector = self
        size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedWriter(raw, size)


@pytest.fixture
def injector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Injector]:
    inj = Injector(tmp_path)
    proxy = _OsProxy(inj.fsync, inj.replace, inj.pwrite)
    for mod in (location_mod, localsink_mod, direct_mod):  # where local files are written
        monkeypatch.setattr(mod, "os", proxy)
        monkeypatch.setattr(mod, "open", inj.open, raising=False)
    yield inj
    inj.disarm()


STEP2 = "step-0000000002"


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


# name -> (op, predicate on the path, a string the error message must contain)
FAULT_POINTS: dict[str, tuple[str, Callable[[str], bool], str]] = {
    "shard-write": ("write", lambda p: p.endswith(".shard"), ".shard"),
    "shard-fsync": ("fsync", lambda p: p.endswith(".shard"), ".shard"),
    "manifest-tmp-fsync": ("fsync", lambda p: os.path.basename(p).startswith(
        M.MANIFEST_NAME + ".tmp-"), M.MANIFEST_NAME),
    "manifest-rename": ("replace", lambda p: p.endswith(f"{STEP2}/{M.MANIFEST_NAME}"),
                        M.MANIFEST_NAME),
    "step-dir-fsync": ("fsync", lambda p: p.endswith("/" + STEP2), STEP2),
    "root-dir-fsync": ("fsync", lambda p: p.endswith("/ckpt") and _is_dir(p), "ckpt"),
}

def _fault_params() -> list[Any]:
    out = []
    for point in FAULT_POINTS:
        for err in ("ENOSPC", "EIO"):
            for mode in ("blocking", "async"):
                out.append(pytest.param(point, err, mode, id=f"{point}-{err}-{mode}"))
    return out


def _save(mgr: shardckpt.CheckpointManager, step: int, state: dict[str, Any],
          mode: str) -> Any:
    if mode == "blocking":
        return mgr.save(step, state, blocking=True).wait()
    handle = mgr.save(step, state, blocking=False)
    return handle.wait(timeout=60)


@pytest.mark.parametrize(("point", "err", "mode"), _fault_params())
def test_fault_fails_save_cleanly(tmp_path: Path, injector: Injector, point: str, err: str,
                                  mode: str) -> None:
    root = tmp_path / "ckpt"
    op, match, names = FAULT_POINTS[point]
    s1, s2 = make_state(1), make_state(2)
    with shardckpt.CheckpointManager(str(root)) as mgr:
        _save(mgr, 1, s1, mode)
        injector.arm(op, match, getattr(errno, err))
        with pytest.raises(Exception) as excinfo:
            _save(mgr, 2, s2, mode)
        assert injector.fired >= 1, f"fault point {point} was never reached"
        injector.disarm()
        exc = excinfo.value
        assert isinstance(exc, shardckpt.StorageError), f"{type(exc).__name__}: {exc}"
        assert names in str(exc), f"message does not name the file: {exc}"
        assert os.strerror(getattr(errno, err)) in str(exc)
        mgr.wait()  # the error was reported once, through the handle
        assert mgr.steps() == [1]
        assert not (root / STEP2 / M.MANIFEST_NAME).exists()
        check_loads(root, {1: s1})
        # The next save, fault removed, succeeds (also over whatever the failure left behind).
        info = _save(mgr, 2, s2, mode)
        assert info is not None and info.step == 2
        assert mgr.steps() == [1, 2]
    check_loads(root, {1: s1, 2: s2})


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_failed_fsync_is_not_retried_into_success(tmp_path: Path, injector: Injector,
                                                  mode: str) -> None:
    root = tmp_path / "ckpt"
    s1 = make_state(1)
    with shardckpt.CheckpointManager(str(root)) as mgr:
        _save(mgr, 1, s1, mode)
        # Only the first shard fsync fails; any retry would succeed.
        injector.arm("fsync", lambda p: p.endswith(".shard"), errno.EIO, times=1)
        with pytest.raises(shardckpt.StorageError, match=r"\.shard"):
            _save(mgr, 2, make_state(2), mode)
        assert injector.fired == 1
        injector.disarm()
        mgr.wait()
        assert mgr.steps() == [1]
    check_loads(root, {1: s1})


def test_failed_fsync_is_not_retried_into_success_any_error(tmp_path: Path,
                                                            injector: Injector) -> None:
    """The part that holds whatever the error type: the save fails, nothing is committed."""
    root = tmp_path / "ckpt"
    s1 = make_state(1)
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, s1)
        injector.arm("fsync", lambda p: p.endswith(".shard"), errno.EIO, times=1)
        with pytest.raises(shardckpt.ShardckptError, match="Input/output error"):
            mgr.save(2, make_state(2))
        assert injector.fired == 1
        injector.disarm()
        assert mgr.steps() == [1]
        assert not (root / STEP2 / M.MANIFEST_NAME).exists()
    check_loads(root, {1: s1})


# ----------------------------------------------------------------------------- full disk
SMALL = 8 << 20


@pytest.fixture
def small_fs(tmp_path: Path, injector: Injector,
             record_property: Callable[[str, object], None]) -> Iterator[tuple[Path, str]]:
    """An 8 MiB filesystem: a real tmpfs where ``mount`` works, else an injected quota.

    Which one ran is said: a warning in pytest's summary when it is the quota (with the reason
    the mount was not possible), and the ``full_disk`` property of the test in any case."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = False
    why = "not root" if os.geteuid() != 0 else "no mount command"
    if os.geteuid() == 0 and shutil.which("mount"):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)
        mounted = res.returncode == 0
        why = f"mount failed: {res.stderr.strip() or res.returncode}"
    record_property("full_disk", "tmpfs" if mounted else "quota")
    if not mounted:
        warnings.warn(f"full disk: no tmpfs ({why}); an injected {SMALL >> 20} MiB quota ran "
                      "instead", UserWarning, stacklevel=1)
        injector.quota = SMALL  # same contract, enforced by ENOSPC from the injected writes
    try:
        yield mnt, "tmpfs" if mounted else "quota"
    finally:
        if mounted:
            res = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _used(mnt: Path, kind: str) -> int:
    if kind == "tmpfs":
        st = os.statvfs(mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    return sum(p.stat().st_size for p in mnt.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_real_full_disk(small_fs: tuple[Path, str], mode: str) -> None:
    mnt, kind = small_fs
    root = mnt / "ckpt"
    s1 = make_state(1)  # ~130 KiB
    big = {"big": torch.arange(5 << 20, dtype=torch.float32)}  # 20 MiB
    small = make_state(3, scale=16)  # ~2 MiB
    with shardckpt.CheckpointManager(str(root), capture_rng=False) as mgr:
        _save(mgr, 1, s1, mode)
        used_before = _used(mnt, kind)
        with pytest.raises(shardckpt.ShardckptError) as excinfo:
            _save(mgr, 2, big, mode)
        exc = excinfo.value
        assert "No space left on device" in str(exc) or "quota" in str(exc), str(exc)
        mgr.wait()
        assert mgr.steps() == [1]
        assert not (root / STEP2).exists() or not (root / STEP2 / M.MANIFEST_NAME).exists()
        # The failed save removed its partial files: the space is free again.
        assert _used(mnt, kind) <= used_before + (256 << 10)
        info = _save(mgr, 3, small, mode)
        assert info is not None and info.step == 3
        assert mgr.steps() == [1, 3]
    check_loads(root, {1: s1, 3: small})


def test_real_full_disk_is_storage_error(small_fs: tuple[Path, str]) -> None:
    mnt, _ = small_fs
    with shardckpt.CheckpointManager(str(mnt / "ckpt"), async_save=False,
                                     capture_rng=False) as mgr:
        with pytest.raises(shardckpt.StorageError, match=r"\.shard"):
            mgr.save(2, {"big": torch.arange(5 << 20, dtype=torch.float32)})


def test_failed_shard_fsync_leaks_no_fd(tmp_path: Path, injector: Injector) -> None:
    root = tmp_path / "ckpt"
    with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False) as mgr:
        injector.arm("fsync", lambda p: p.endswith(".shard"), errno.EIO)
        with pytest.raises(shardckpt.ShardckptError) as excinfo:
            mgr.save(2, make_state(2))
        injector.disarm()
        fds = os.listdir("/proc/self/fd")
        leaked = []
        for fd in fds:
            with contextlib.suppress(OSError):
                if str(root) in os.readlink(f"/proc/self/fd/{fd}"):
                    leaked.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert excinfo.value is not None
        assert not leaked, f"open fds after the failed save: {leaked}"


# ----------------------------------------------------------------------------- power loss
class _Crash(BaseException):
    """The machine lost power: no ``except Exception`` cleanup runs, and every later durability
    call raises it again (the process is gone)."""


class PowerLossFS:
    """Records what fsync made durable, and can "crash" at the k-th durability call.

    Durability calls are the ``os.fsync`` and ``os.replace`` calls of
    ``shardckpt.storage.local``. Model (a strict, ext4-like filesystem without the
    ``auto_da_alloc`` rename heuristics):

    * fsync of a regular file makes its *data* durable as of that moment (keyed by inode, so a
      later rename keeps it). A file never fsynced survives empty (truncated to 0).
    * fsync of a directory makes its *entries* durable as of that moment (name -> inode): files
      created or renamed into it, subdirectories made in it, entries removed from it. An entry
      whose directory was not fsynced after it appeared vanishes; a rename not followed by a
      directory fsync is undone.
    * Nothing is reordered across an fsync, and there are no torn writes within one fsynced
      file. The checkpoint root itself is taken as durable and empty at the start (the library
      is not asked to fsync the root's parent).

    Not modelled: metadata-only journaling making un-fsynced renames durable anyway, partially
    persisted un-fsynced data, torn sectors, a lying disk cache, inode reuse between a deleted
    file's durable data and a new file, and files written outside ``location.py`` (leases).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.crash_at: int | None = None
        self.count = 0
        self.crashed = False
        self.data: dict[int, bytes] = {}
        self.dirs: dict[int, dict[str, tuple[str, int]]] = {}
        self.lock = threading.Lock()
        self.root_ino = root.stat().st_ino
        self.dirs[self.root_ino] = self._listing(str(root))

    @staticmethod
    def _listing(path: str) -> dict[str, tuple[str, int]]:
        out = {}
        with os.scandir(path) as it:
            for e in it:
                kind = "dir" if e.is_dir(follow_symlinks=False) else "file"
                out[e.name] = (kind, e.inode())
        return out

    def _tick(self) -> None:
        with self.lock:
            if self.crashed:
                raise _Crash("already crashed")
            if self.crash_at is not None and self.count == self.crash_at:
                self.crashed = True
                raise _Crash(f"power lost at durability call {self.count}")
            self.count += 1

    def fsync(self, fd: int) -> None:
        path = fd_path(fd)
        if not path.startswith(str(self.root)):
            return REAL_OS.fsync(fd)
        self._tick()
        REAL_OS.fsync(fd)
        st = os.fstat(fd)
        with self.lock:
            if stat.S_ISDIR(st.st_mode):
                self.dirs[st.st_ino] = self._listing(path)
            else:
                with REAL_OPEN(path, "rb") as fh:
                    self.data[st.st_ino] = fh.read()

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst).startswith(str(self.root)):
            self._tick()
        REAL_OS.replace(src, dst, *args, **kwargs)

    def materialise(self, dest: Path) -> None:
        """Write the state that survives the crash to ``dest`` (a new directory)."""
        def build(ino: int, out: Path) -> None:
            out.mkdir()
            for name, (kind, child) in self.dirs.get(ino, {}).items():
                if kind == "dir":
                    build(child, out / name)
                else:
                    (out / name).write_bytes(self.data.get(child, b""))
        build(self.root_ino, dest)


def _run_sequence(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                  crash_at: int | None) -> tuple[PowerLossFS, list[int], dict[int, Any]]:
    root = tmp / "ckpt"
    root.mkdir(parents=True)
    fs = PowerLossFS(root)
    fs.crash_at = crash_at
    states = {1: make_state(1), 2: make_state(2)}
    reported: list[int] = []
    with monkeypatch.context() as mp:
        for mod in (location_mod, localsink_mod):
            mp.setattr(mod, "os", _OsProxy(fs.fsync, fs.replace))
        mgr = shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False)
        try:
            for step, state in states.items():
                info = mgr.save(step, state).wait()
                assert info is not None and info.step == step
                reported.append(step)
        except _Crash:
            pass
        finally:
            fs.crashed = True  # nothing after this point reaches the disk
            with contextlib.suppress(BaseException):
                mgr.close()
    return fs, reported, states


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # crash: no cleanup
def test_power_loss_at_every_durability_call(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two blocking saves; power is lost before each durability call in turn (and once after
    the last). What survives (see :class:`PowerLossFS`) is materialised into a fresh directory,
    where: every step whose manifest survived loads bit for bit, every save that had reported
    success survives, and nothing else appears."""
    monkeypatch.setenv("SHARDCKPT_IO_THREADS", "1")  # one deterministic order of fsyncs
    fs, reported, states = _run_sequence(tmp_path / "clean", monkeypatch, None)
    assert reported == [1, 2]
    total = fs.count
    assert total >= 8, f"only {total} durability calls for two saves"
    print(f"{total} durability calls in two saves")
    seen_partial = False
    for k in range(total + 1):
        base = tmp_path / f"k{k:03d}"
        base.mkdir()
        fs, reported, states = _run_sequence(base, monkeypatch, k if k < total else None)
        assert fs.crashed
        survived = base / "survived"
        fs.materialise(survived)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with shardckpt.CheckpointManager(str(survived), async_save=False,
                                             capture_rng=False) as mgr:
                steps = mgr.steps()
                assert set(steps) <= {1, 2}, (k, steps)
                assert set(reported) <= set(steps), \
                    f"crash at call {k}: saves {reported} had succeeded, survivors {steps}"
                for step in steps:
                    got = zeros_like(states[step])
                    assert mgr.load(got, step=step) == step
                    assert_bit_equal(got, states[step], f"crash at {k}, step {step}")
        seen_partial |= reported == [1]
        if k == total:
            assert reported == [1, 2] and steps == [1, 2]
        shutil.rmtree(base)
    assert seen_partial
