"""Issue 30, session 9: small writes of a direct local file are packed into whole blocks
(storage/localsink.py): the file holds exactly the bytes written, only its last partial block
goes through the page cache, and a refusal of O_DIRECT at any point falls back to buffered
writes without losing or repeating a byte."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from shardckpt.storage import direct, localsink
from shardckpt.storage.local import LocalLocation

MiB, BLOCK = 1 << 20, 4096


def needs_direct(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    w = direct.DirectWriter.open(str(probe))
    if w is None:  # pragma: no cover - tmpfs; the machine's disk has O_DIRECT
        pytest.fail("this test needs a filesystem with O_DIRECT (the suite's tmp is on disk)")
    w.close()


def aligned(n: int, fill: int) -> memoryview:
    buf = mmap.mmap(-1, n)
    buf.write(bytes([fill]) * n)
    return memoryview(buf)


def workload() -> list[object]:
    """Many small chunks (a LoRA state's adapters), padding, large aligned and unaligned
    chunks, read-only bytes, and a ragged end."""
    out: list[object] = [b"preamble" + b"\0" * 56]
    out += [memoryview(bytearray(os.urandom(72 * 1024 + i)))[i:] for i in range(40)]
    out += [b"\0" * (-sum(len(memoryview(p).cast("B")) for p in out) % BLOCK)]  # to a block
    out += [aligned(2 * MiB, 0xA5), aligned(MiB + 100, 0x5A)]  # direct (+ a staged tail)
    out += [bytes(os.urandom(300_000)), memoryview(bytearray(os.urandom(3 * MiB + 1)))[1:]]
    out += [b"tail"]
    return out


def write(tmp_path: Path, parts: list[object], name: str = "f.shard") -> bytes:
    sink = LocalLocation(str(tmp_path)).open_sink(name)
    expected = b""
    for p in parts:
        assert sink.write(p) == len(memoryview(p).cast("B"))
        expected += bytes(memoryview(p).cast("B"))
    sink.commit()
    assert (tmp_path / name).read_bytes() == expected
    return expected


def test_small_writes_are_packed_into_direct_block_writes(tmp_path: Path, monkeypatch) -> None:
    needs_direct(tmp_path)
    buffered: list[int] = []
    real_spill = localsink._Stage.spill

    def spill(self, f):  # type: ignore[no-untyped-def]
        buffered.append(self.fill)
        return real_spill(self, f)
    monkeypatch.setattr(localsink._Stage, "spill", spill)
    data = write(tmp_path, workload())
    assert buffered == [len(data) % BLOCK]  # the last partial block alone, once


@pytest.mark.parametrize("refuse_at", [1, 2, 3, 5])
def test_a_refusal_at_any_direct_write_loses_and_repeats_nothing(tmp_path: Path, monkeypatch,
                                                                 refuse_at: int) -> None:
    needs_direct(tmp_path)
    calls: list[int] = []
    real = os.pwrite

    def pwrite(fd, data, offset):  # type: ignore[no-untyped-def]
        calls.append(offset)
        if len(calls) == refuse_at:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    write(tmp_path, workload())
    assert len(calls) >= refuse_at  # the refusal happened, and the file is still exact


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    needs_direct(tmp_path)
    write(tmp_path, workload(), "a.shard")
    kept = list(localsink._free)
    assert kept  # given back at the commit
    write(tmp_path, workload(), "b.shard")
    assert {id(b) for b in localsink._free} & {id(b) for b in kept}


def test_an_aborted_file_is_removed_and_gives_its_stage_back(tmp_path: Path) -> None:
    needs_direct(tmp_path)
    localsink._free.clear()
    sink = LocalLocation(str(tmp_path)).open_sink("x.shard")
    sink.write(os.urandom(5000))
    sink.abort()
    assert not (tmp_path / "x.shard").exists()
    assert len(localsink._free) == 1


def test_without_direct_io_every_byte_is_buffered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "0")
    write(tmp_path, workload())


def test_a_refusal_in_a_flusher_thread_is_rewritten_through_the_cache(tmp_path: Path,
                                                                      monkeypatch) -> None:
    import threading

    needs_direct(tmp_path)
    refused: list[int] = []
    real = os.pwrite

    def pwrite(fd, data, offset):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("shardckpt-flush"):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    write(tmp_path, workload())  # exact, though a staged buffer's direct write failed
    assert refused


def test_flushes_overlap_the_next_writes(tmp_path: Path, monkeypatch) -> None:
    """A full staging buffer is written by a flusher thread: the file's own thread goes on
    filling the next one (it waits only once IN_FLIGHT are being written)."""
    import threading

    needs_direct(tmp_path)
    release = threading.Event()
    started = threading.Event()
    real = localsink._pwrite_all

    def slow(fd, buf, n, offset):  # type: ignore[no-untyped-def]
        started.set()
        assert release.wait(30)
        return real(fd, buf, n, offset)
    monkeypatch.setattr(localsink, "_pwrite_all", slow)
    sink = LocalLocation(str(tmp_path)).open_sink("o.shard")
    chunk = os.urandom(64 * 1024)
    for _ in range(localsink.STAGE_BYTES // len(chunk) + 3):  # one full buffer and more
        sink.write(chunk)
    assert started.wait(30)  # the first buffer is being written, and writes went on
    release.set()
    sink.commit()
    assert (tmp_path / "o.shard").read_bytes() == chunk * (localsink.STAGE_BYTES // len(chunk) + 3)
