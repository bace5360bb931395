"""Issue 24: the buffers that make saves cheap are reused, and never while a save still needs
them.

* A blocking save's bounce stage (engine/bounce.py): encoder threads copy chunks of the live
  tensors into aligned buffers a window ahead of the writer; a buffer goes back to the pool only
  once the writer has written its chunk, at most window + 1 are held per file, and they are kept
  warm for the next save.
* The eager snapshot's staging buffers (engine/snapshot.py) are reused by the next save, which
  therefore first waits for the previous save to finish writing from them.
* The eager copy (engine/hostcopy.py) is exact whatever the tensor's layout.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.engine import bounce, hostcopy
from shardckpt.engine.pipeline import EncodePipeline, PipelineConfig
from shardckpt.format.shard import Codec, checksum, split_chunks
from shardckpt.handles import SaveHandle
from shardckpt.storage import direct
from shardckpt.storage.local import LocalLocation, _LocalSink
from shardckpt.storage.replicas import open_tee

KiB, MiB = 1 << 10, 1 << 20


class InlinePool:
    """An executor that runs each task as it is submitted: the encoders as far ahead of the
    writer as the window lets them be, deterministically."""

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future


def unaligned(nbytes: int) -> memoryview:
    data = bytearray(os.urandom(nbytes + 1))
    view = memoryview(data)[1:]
    assert direct.address(view) % direct.BLOCK
    return view


def test_a_bounce_buffer_is_reused_only_after_its_chunk_was_written() -> None:
    config = PipelineConfig(Codec(None), MiB, window=3)
    pool = bounce.BufferPool()
    stage = bounce.Bounce(config, nfiles=1, pool=pool)
    source = unaligned(20 * MiB + 100)
    expected = [bytes(c) for c in split_chunks(source, MiB)]
    chunks = stage.released(EncodePipeline(config, InlinePool()).encode(  # type: ignore[arg-type]
        split_chunks(source, MiB), stage.encode))
    got = []
    for chunk in chunks:  # the "writer": by now the encoders ran `window` chunks ahead
        got.append(bytes(chunk.stored))
        assert chunk.xxh3 == checksum(expected[len(got) - 1])
        if len(got) <= 20:  # the ragged last chunk (100 B) is not worth a copy
            assert direct.address(chunk.stored) % direct.BLOCK == 0
    assert got == expected
    assert pool.made == config.window + 1  # at most window + 1 held at once, then reused
    assert pool.free_bytes == (config.window + 1) * MiB  # all back, kept warm


def test_bounce_buffers_go_back_when_the_writer_stops_early() -> None:
    config = PipelineConfig(Codec(None), MiB, window=2)
    pool = bounce.BufferPool()
    stage = bounce.Bounce(config, nfiles=1, pool=pool)
    chunks = stage.released(EncodePipeline(config, InlinePool()).encode(  # type: ignore[arg-type]
        split_chunks(unaligned(10 * MiB), MiB), stage.encode))
    next(chunks)
    chunks.close()  # a failed write: write_file closes the stream
    assert pool.free_bytes >= MiB


def test_compressed_aligned_and_small_chunks_are_not_bounced() -> None:
    pool = bounce.BufferPool()
    raw = bounce.Bounce(PipelineConfig(Codec(None), MiB, 4), 1, pool)
    zstd = bounce.Bounce(PipelineConfig(Codec("zstd:1"), MiB, 4), 1, pool)
    aligned = memoryview(mmap.mmap(-1, 256 * KiB))
    assert raw.encode(Codec(None), aligned).stored is aligned
    small = unaligned(10 * KiB)
    assert raw.encode(Codec(None), small).stored is small
    # under DIRECT_WRITE_MIN a chunk is written through the page cache: a copy gains nothing
    below = unaligned(direct.DIRECT_WRITE_MIN - 1)
    assert raw.encode(Codec(None), below).stored is below
    assert zstd.encode(Codec("zstd:1"), unaligned(256 * KiB)).codec in ("raw", "zstd")
    assert pool.made == 0


def test_the_stage_respects_the_memory_budget(monkeypatch) -> None:
    config = PipelineConfig(Codec(None), 16 * MiB, 4)
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", str(160 * MiB))
    assert bounce.fits(config, 2)  # 2 files x (4 + 1) x 16 MiB
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", str(159 * MiB))
    assert not bounce.fits(config, 2)
    assert not bounce.fits(PipelineConfig(Codec("zstd:1"), 16 * MiB, 4), 1)


def test_only_one_synchronous_local_direct_file_gets_the_stage(tmp_path: Path) -> None:
    loc = LocalLocation(str(tmp_path))
    (tmp_path / "b").mkdir()
    one = open_tee([(0, loc)], "one")
    two = open_tee([(0, loc), (1, LocalLocation(str(tmp_path / "b")))], "two")
    try:
        probe = direct.DirectWriter.open(str(tmp_path / "one"))
        assert bounce.writes_direct(one) == (probe is not None)  # tmpfs has no O_DIRECT
        if probe is not None:
            probe.close()
        assert not bounce.writes_direct(two)  # a tee queues the bytes for its threads
    finally:
        one.abort()
        two.abort()


def test_blocking_saves_reuse_warm_bounce_buffers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(direct.DirectWriter, "open", classmethod(
        lambda cls, path: cls(os.open(path, os.O_WRONLY))))
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(MiB))
    monkeypatch.setattr(bounce, "POOL", pool := bounce.BufferPool())
    torch.manual_seed(0)
    state = {"a": torch.randn(MiB + 3)[1:], "b": torch.randn(700_001)}
    first = state["a"].clone()
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state, blocking=True)
        assert 0 < pool.made <= 2 * (4 + 1)  # files x (window + 1), for 6 whole chunks
        state["a"].add_(1)
        mgr.save(2, state, blocking=True)
        # 12 chunks bounced in all, through at most as many buffers as are ever held at once
        # (which ones are held together depends on the threads' timing)
        assert pool.made <= 2 * (4 + 1)
        assert pool.free_bytes == pool.made * MiB  # every one back, kept warm
        for step, a in ((1, first), (2, state["a"])):
            out = {k: torch.zeros_like(v) for k, v in state.items()}
            mgr.load(out, step=step)
            assert torch.equal(out["a"], a)
            assert torch.equal(out["b"], state["b"])
    assert pool.free_bytes == 0  # close() unmaps them


def test_next_save_waits_for_the_previous_one_before_reusing_its_staging_buffers(
        tmp_path: Path, monkeypatch) -> None:
    """Save 2 copies into the buffers save 1 is still writing from only after save 1 is done:
    save 1's writer is held until save 2 has started waiting for it."""
    second_waits = threading.Event()
    main = threading.get_ident()
    real_wait, real_write = SaveHandle.wait, _LocalSink.write

    def wait(self: SaveHandle, timeout: float | None = None) -> Any:
        if self.step == 1 and threading.get_ident() != main:
            second_waits.set()  # save 2 (on its own thread) waits for save 1
        return real_wait(self, timeout)

    def write(self: _LocalSink, data: Any) -> int:
        if "step-0000000001" in self.path and not second_waits.is_set():
            second_waits.wait(timeout=60)  # a guard against a hang, not a synchronization
        return real_write(self, data)

    monkeypatch.setattr(SaveHandle, "wait", wait)
    monkeypatch.setattr(_LocalSink, "write", write)
    state = {"w": torch.full((MiB,), 1.0), "v": torch.arange(50_000.0)}
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state)  # async: returns once copied; its writer is held
        with torch.no_grad():
            state["w"].fill_(2.0)
            state["v"].mul_(-1)
        errors: list[BaseException] = []

        def second() -> None:
            try:
                mgr.save(2, state).wait()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join(120)
        assert not t.is_alive() and not errors
        mgr.wait()
        for step, w, sign in ((1, 1.0, 1), (2, 2.0, -1)):
            out = {k: torch.zeros_like(v) for k, v in state.items()}
            mgr.load(out, step=step)
            assert torch.equal(out["w"], torch.full((MiB,), w)), step
            assert torch.equal(out["v"], sign * torch.arange(50_000.0)), step


@pytest.mark.parametrize("make", [
    lambda: torch.randn(300_000),                                # contiguous: memcpy
    lambda: torch.randn(600, 1000)[:, ::2],                      # strided: copy_
    lambda: torch.randn(400_000)[7:],                            # at a storage offset: memcpy
    lambda: torch.randn(100_000, dtype=torch.complex64).conj(),  # conjugate bit: copy_
    lambda: torch.randn(100_000, dtype=torch.complex64).conj().imag,  # negative bit: copy_
    lambda: torch.arange(10),                                    # small: copy_
])
def test_eager_copy_is_exact_for_any_layout(make: Any, monkeypatch) -> None:
    calls: list[int] = []
    real = ctypes.memmove
    monkeypatch.setattr(hostcopy.ctypes, "memmove",
                        lambda dst, src, n: (calls.append(n), real(dst, src, n))[1])
    src = make()
    buf = torch.empty(src.shape, dtype=src.dtype)
    hostcopy.copy_into(buf, src)
    assert torch.equal(buf.resolve_conj().resolve_neg(), src.resolve_conj().resolve_neg())
    plain = src.is_contiguous() and not src.is_conj() and not src.is_neg() \
        and src.numel() * src.element_size() >= hostcopy.MEMCPY_MIN
    assert calls == ([src.numel() * src.element_size()] if plain else [])
