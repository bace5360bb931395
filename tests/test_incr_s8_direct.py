"""Session 8: a local shard file's sink writes chunks under ``DIRECT_WRITE_MIN`` (1 MiB) through
the page cache, larger aligned ones directly (storage/direct.py), and the file holds exactly the
bytes written. Small direct writes each waited for the device: a LoRA-style incremental save
writes many small chunks (docs/benchmarks.md, "Incremental save time, session 8")."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from shardckpt.storage import direct
from shardckpt.storage.local import LocalLocation

KiB, MiB = 1 << 10, 1 << 20


def aligned(n: int, fill: int) -> memoryview:
    buf = mmap.mmap(-1, n)
    buf.write(bytes([fill]) * n)
    return memoryview(buf)


def test_small_chunks_go_buffered_large_ones_direct(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    offered: list[int] = []
    real = direct.DirectWriter.write

    def counting(self: direct.DirectWriter, view: memoryview, offset: int) -> int:
        offered.append(len(view))
        return real(self, view, offset)

    monkeypatch.setattr(direct.DirectWriter, "write", counting)
    pieces = [aligned(4 * KiB, 1), aligned(76 * KiB, 2), aligned(256 * KiB, 3),
              aligned(MiB - 4 * KiB, 4), aligned(MiB, 5), aligned(2 * MiB, 6)]
    sink = LocalLocation(str(tmp_path)).open_sink("f.shard")
    has_direct = sink._direct is not None  # type: ignore[attr-defined]  # tmpfs: none
    for p in pieces:
        assert sink.write(p) == len(p)
    sink.commit()
    assert (tmp_path / "f.shard").read_bytes() == b"".join(bytes(p) for p in pieces)
    assert direct.DIRECT_WRITE_MIN == MiB
    if has_direct:
        assert offered == [MiB, 2 * MiB]  # under 1 MiB: never offered to the direct writer
