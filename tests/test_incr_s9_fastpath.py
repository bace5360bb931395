"""Issue 30, session 9: the incremental save's fast path.

* format/nogilhash.py: XXH3 of large buffers through the binding's own C entry points, without
  the GIL; the values are the binding's, for every kind of buffer a save hashes.
* engine/prehash.py: the chunks equal to the base's are found first, in batches, and never
  reach the encode pipeline; the others are encoded as in a full save.
* storage/writeback.py: buffered bytes of a shard file are handed to the disk as they are
  written, not all at the fsync of the commit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import xxhash

import shardckpt
from shardckpt.engine import prehash
from shardckpt.engine.tensorbytes import byte_view
from shardckpt.format import nogilhash
from shardckpt.format.codec import digest128
from shardckpt.storage import localsink, writeback

MiB = 1 << 20


def buffers() -> list[object]:
    data = os.urandom(3 * MiB + 17)
    t = torch.arange(MiB, dtype=torch.float32)
    return [data, bytearray(data), memoryview(data)[5:], memoryview(bytearray(data))[7:],
            byte_view(t), memoryview(bytearray(data[:3 * MiB])).cast("I"), b"",
            os.urandom(100)]


@pytest.mark.parametrize("i", range(8))
def test_nogil_digests_are_the_bindings(i: int) -> None:
    buf = buffers()[i]
    assert nogilhash.xxh3_128_hex(buf) == xxhash.xxh3_128_hexdigest(buf)
    assert nogilhash.xxh3_64_hex(buf) == xxhash.xxh3_64_hexdigest(buf)


def test_large_writable_buffers_bypass_the_binding(monkeypatch) -> None:
    assert nogilhash.available()  # x86-64 Linux with the PyPI wheel: the C entry points exist
    want = xxhash.xxh3_128_hexdigest(big := bytearray(os.urandom(2 * MiB)))
    want_mid = xxhash.xxh3_128_hexdigest(mid := bytearray(os.urandom(70_000)))

    def refuse(data: object) -> str:
        raise AssertionError("the binding (with the GIL) was used")
    monkeypatch.setattr(nogilhash.xxhash, "xxh3_128_hexdigest", refuse)
    assert nogilhash.xxh3_128_hex(big) == want
    # from HELD_MIN the binding would let the GIL go: the entry points that keep it
    assert nogilhash.xxh3_128_hex(mid) == want_mid
    with pytest.raises(AssertionError, match="binding"):  # small: the binding, on purpose
        nogilhash.xxh3_128_hex(bytearray(100))
    with pytest.raises(AssertionError, match="binding"):  # read-only, not bytes: the binding
        nogilhash.xxh3_128_hex(memoryview(bytes(big))[1:])


def test_a_failed_self_check_falls_back_to_the_binding(monkeypatch) -> None:
    monkeypatch.setattr(nogilhash, "_checked", True)
    monkeypatch.setattr(nogilhash, "_fns", None)
    big = os.urandom(2 * MiB)
    assert not nogilhash.available()
    assert nogilhash.xxh3_64_hex(big) == xxhash.xxh3_64_hexdigest(big)


def test_large_chunks_are_hashed_in_file_order_batches(monkeypatch) -> None:
    monkeypatch.setattr(prehash, "BATCH_BYTES", 2 * MiB)
    chunks = [memoryview(os.urandom(n)) for n in (MiB, 10, MiB, MiB, 300_000, 5, MiB)]
    expects: list[str | None] = [digest128(c) for c in chunks]
    expects[2] = "0" * 32  # changed
    expects[4] = None  # no base chunk there
    pool = ThreadPoolExecutor(2)
    try:
        same = prehash.Verdicts(chunks, expects, pool)
        # the four large chunks with a base chunk, two batches of 2 MiB; the small ones inline
        assert [same.needs_batch(i) for i in range(7)] == \
            [True, False, True, True, False, False, True]
        assert len(same._futures) == 2
        assert [same(i) for i in range(7)] == [True, True, False, True, False, True, True]
    finally:
        pool.shutdown()


def test_a_verdict_is_computed_once(monkeypatch) -> None:
    calls: list[int] = []
    chunk = memoryview(b"x" * 100)
    monkeypatch.setattr(prehash, "digest128", lambda c: calls.append(1) or "a" * 32)
    same = prehash.Verdicts([chunk], ["a" * 32], None)
    assert same(0) and same(0) and calls == [1]  # the pipeline and the writer agree


@pytest.mark.parametrize("with_pool", [False, True])
def test_unchanged_chunks_never_reach_the_pipeline(with_pool: bool) -> None:
    chunks = [memoryview(os.urandom(n)) for n in (MiB, 10, MiB)]
    expects: list[str | None] = [digest128(chunks[0]), "0" * 32, None]
    pool = ThreadPoolExecutor(1) if with_pool else None
    try:
        same = prehash.Verdicts(chunks, expects, pool)
        none = prehash.direct_below(same, 0)  # nothing encoded on the spot
        todo = list(prehash.changed(chunks, same, none))
        assert [len(c) for c in todo] == [10, MiB]
        out = list(prehash.merged(chunks, same, iter(["B", "C"]), none))  # type: ignore[arg-type]
        assert out[1:] == ["B", "C"]
        assert (out[0].reused, out[0].raw, out[0].xxh128) == (True, MiB, expects[0])
    finally:
        if pool is not None:
            pool.shutdown()


def test_small_changed_chunks_are_encoded_on_the_spot_hashed_once(monkeypatch) -> None:
    big, small, new = (memoryview(bytearray(os.urandom(n))) for n in (MiB, 70_000, 300))
    chunks = [big, small, new]
    expects: list[str | None] = ["0" * 32, "1" * 32, None]  # all changed; ``new`` has no base
    hashed: list[int] = []
    real = prehash.digest128
    monkeypatch.setattr(prehash, "digest128", lambda c: hashed.append(len(c)) or real(c))
    pool = ThreadPoolExecutor(1)
    try:
        same = prehash.Verdicts(chunks, expects, pool)
        direct = prehash.direct_below(same, 100_000)
        assert [direct(i) for i in range(3)] == [False, True, True]  # ``big`` waits for a batch
        todo = list(prehash.changed(chunks, same, direct))
        assert [len(c) for c in todo] == [MiB]  # only the large one goes to the pipeline
        out = list(prehash.merged(chunks, same, iter(["BIG"]), direct))  # type: ignore[arg-type]
    finally:
        pool.shutdown()
    assert out[0] == "BIG"
    for got, c in zip(out[1:], chunks[1:]):
        assert (got.stored, got.raw, got.codec, got.reused) == (c, len(c), "raw", False)
        assert got.xxh128 == xxhash.xxh3_128_hexdigest(c)
        assert got.xxh3 == xxhash.xxh3_64_hexdigest(c)
    assert sorted(hashed) == [300, 70_000, MiB]  # each chunk hashed once, not again to encode


def test_pieces_without_a_batch_go_first_in_order() -> None:
    assert prehash.order([1, 2, 3, 4, 5], lambda x: x % 2 == 1) == [2, 4, 1, 3, 5]


def test_buffered_bytes_are_handed_to_writeback_as_they_come(tmp_path: Path,
                                                             monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(localsink, "start_writeback",
                        lambda fd, off, n: calls.append((off, n)) or True)
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "0")  # no direct descriptor: the page cache
    sink = localsink._LocalSink(str(tmp_path / "f"))
    piece = os.urandom(300_000)  # under DIRECT_WRITE_MIN: buffered
    for _ in range(8):
        sink.write(piece)
    sink.commit()
    assert calls and calls[0][0] == 0 and sum(n for _, n in calls) <= 8 * len(piece)
    assert all(n >= writeback.KICK_BYTES for _, n in calls)
    assert (tmp_path / "f").read_bytes() == piece * 8
    calls.clear()
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")  # no durability asked: no writeback either
    sink = localsink._LocalSink(str(tmp_path / "g"))
    for _ in range(8):
        sink.write(piece)
    sink.commit()
    assert calls == []


def test_start_writeback_on_a_real_file(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        f.write(os.urandom(2 * MiB))
        f.flush()
        assert writeback.start_writeback(f.fileno(), 0, 2 * MiB) is (
            writeback._load() is not None)
        assert writeback.start_writeback(f.fileno(), 0, 0) is False


def test_incremental_save_hands_only_changed_chunks_to_the_pipeline(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A frozen tensor's chunks never reach the encoder; a small changed one is encoded by the
    writer on the spot, a large one by the pipeline; the steps load bit for bit."""
    from shardckpt.engine import pipeline

    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(MiB))
    seen: list[int] = []
    orig = pipeline.EncodePipeline.encode

    def spy(self, chunks, fn=None):  # type: ignore[no-untyped-def]
        chunks = list(chunks)
        seen.append(sum(len(c) for c in chunks))
        return orig(self, chunks, fn)
    monkeypatch.setattr(pipeline.EncodePipeline, "encode", spy)
    torch.manual_seed(0)
    state = {"frozen": torch.randn(4 * MiB // 4), "adapter": torch.randn(1000),
             "head": torch.randn(MiB // 4)}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        assert sum(seen) == 5 * MiB + 4000
        seen.clear()
        state["adapter"].add_(1)
        state["head"].add_(1)
        mgr.save(2, state)
        assert sum(seen) == MiB  # the head (a batch verdict); the adapter on the spot
        assert mgr.info(2).nbytes < MiB + 64 * 1024  # only the adapter and the head written
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        mgr.load(out, step=2)
        assert all(torch.equal(out[k], state[k]) for k in state)


def test_write_pools_are_kept_per_thread_and_never_evicted_in_use(monkeypatch) -> None:
    from shardckpt.engine import pools

    monkeypatch.setattr(pools, "KEEP", 1)
    with pools.pool("t-encode", 2) as a:
        with pools.pool("t-write", 3) as b:  # over KEEP, but both in use: none shut down
            assert a.submit(lambda: 1).result() == 1 and b.submit(lambda: 2).result() == 2
    with pools.pool("t-write", 3) as again:  # the idle one kept (KEEP=1) is the newest
        assert again is b
        assert again.submit(lambda: 3).result() == 3
    other: list[object] = []

    def in_thread() -> None:
        with pools.pool("t-write", 3) as p:
            other.append(p)
    t = __import__("threading").Thread(target=in_thread)
    t.start()
    t.join()
    assert other and other[0] is not b  # another thread (rank, manager) has its own


def test_blocking_saves_start_no_threads_after_the_first(tmp_path: Path) -> None:
    import threading

    state = {"w": torch.randn(300_000), "b": torch.randn(10)}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        names = {t.name for t in threading.enumerate() if t.name.startswith("shardckpt-")}
        mgr.save(2, state)
        again = {t.name for t in threading.enumerate() if t.name.startswith("shardckpt-")}
        assert {n for n in again if "encode" in n or "write" in n} <= names
