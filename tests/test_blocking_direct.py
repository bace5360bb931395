"""Blocking saves write like async ones (issue 24 item 4): large chunks of the live tensors, at
unaligned addresses, go to the disk through aligned bounce buffers with direct I/O instead of
through the page cache (the encoders' chunk buffers, engine/bounce.py, or under a small budget
the writer's own), and the file holds exactly the bytes written."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import shardckpt
from shardckpt.storage import direct

MiB = 1 << 20


def plain_writer(path: str) -> direct.DirectWriter:
    """A DirectWriter on an ordinary descriptor: the same code path on any filesystem (tmpfs
    has no O_DIRECT)."""
    return direct.DirectWriter(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def test_unaligned_buffer_goes_through_the_bounce_buffer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", str(64 * 256 * 1024))  # bounce: 256 KiB
    assert direct.bounce_size() == 256 * 1024
    data = bytearray(os.urandom(3 * MiB + 4096 + 1))
    view = memoryview(data)[1:]  # an unaligned address
    assert direct.address(view) % direct.BLOCK
    path = str(tmp_path / "f")
    w = plain_writer(path)
    n = w.write(view, 0)
    assert n == len(view) - len(view) % direct.BLOCK  # every whole block, in 13 bounces
    assert w._bounce is not None and len(w._bounce) == 256 * 1024
    w.close()
    assert Path(path).read_bytes() == bytes(view[:n])
    assert w._bounce is None  # released with the writer


def test_bounce_size_stays_within_bounds(monkeypatch) -> None:
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", "4G")
    assert direct.bounce_size() == direct.BOUNCE_MAX
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", "1M")
    assert direct.bounce_size() == direct.DIRECT_MIN


def test_blocking_save_of_live_tensors_is_written_direct(tmp_path: Path, monkeypatch) -> None:
    """The encoders copy the live tensor's chunks into aligned buffers (engine/bounce.py), so the
    writer hands whole chunks to the disk directly and never needs its own bounce buffer."""
    bounced: list[int] = []
    direct_writes: list[int] = []
    real = direct.DirectWriter._write_bounced
    real_write = direct.DirectWriter.write

    def counting(self: direct.DirectWriter, addr: int, n: int, offset: int) -> int:
        bounced.append(n)
        return real(self, addr, n, offset)

    def writing(self: direct.DirectWriter, view: memoryview, offset: int) -> int:
        n = real_write(self, view, offset)
        if n:
            assert direct.address(view) % direct.BLOCK == 0  # an aligned buffer, written whole
            direct_writes.append(n)
        return n

    monkeypatch.setattr(direct.DirectWriter, "_write_bounced", counting)
    monkeypatch.setattr(direct.DirectWriter, "write", writing)
    monkeypatch.setattr(direct.DirectWriter, "open", classmethod(
        lambda cls, path: cls(os.open(path, os.O_WRONLY))))
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(MiB))
    torch.manual_seed(0)
    big = torch.randn(3 * MiB + 5)[1:]  # a view 4 bytes into its storage: not page-aligned
    state = {"big": big, "small": torch.arange(10)}
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state, blocking=True)
        assert bounced == []
        assert sum(direct_writes) >= 3 * 4 * MiB - direct.BLOCK  # the live tensor, direct
        assert max(direct_writes) == MiB  # whole chunks, one pwrite each
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        mgr.load(out, step=1)
    assert torch.equal(out["big"], big) and torch.equal(out["small"], state["small"])


def test_blocking_save_over_a_small_budget_uses_the_writers_bounce(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Where the encoders' aligned buffers would not fit in SHARDCKPT_MEMORY_BUDGET, the writer
    bounces through its own small buffer, as before."""
    bounced: list[int] = []
    real = direct.DirectWriter._write_bounced

    def counting(self: direct.DirectWriter, addr: int, n: int, offset: int) -> int:
        bounced.append(n)
        return real(self, addr, n, offset)

    monkeypatch.setattr(direct.DirectWriter, "_write_bounced", counting)
    monkeypatch.setattr(direct.DirectWriter, "open", classmethod(
        lambda cls, path: cls(os.open(path, os.O_WRONLY))))
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", str(8 * MiB))  # < 2 files x 5 x 16 MiB
    torch.manual_seed(0)
    big = torch.randn(3 * MiB + 5)[1:]
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, {"big": big}, blocking=True)
        assert sum(bounced) >= 3 * 4 * MiB - direct.BLOCK
        out = {"big": torch.zeros_like(big)}
        mgr.load(out, step=1)
    assert torch.equal(out["big"], big)
