"""Session 10: the small-chunk path of incremental saves.

* format/nogilhash.py: buffers from HELD_MIN to MIN_BYTES are hashed through the C entry points
  with the GIL held (the binding lets it go from 64 KiB, and winning it back behind a thread
  running Python costs up to the switch interval);
* engine/writer.py: the pieces' byte views are taken by the thread that calls write_rank, never
  by a file writer.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import xxhash

import shardckpt
from shardckpt.engine import writer
from shardckpt.format import nogilhash


def _spun(hash_fn, buf: bytearray, calls: int = 200) -> int:
    """How many turns a thread spinning in Python ran while ``calls`` hashes of ``buf`` ran."""
    stop = threading.Event()
    turns = 0

    def spin() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
    t = threading.Thread(target=spin)
    t.start()
    try:
        before = turns
        for _ in range(calls):
            hash_fn(buf)
        return turns - before
    finally:
        stop.set()
        t.join()


def test_mid_sized_hashes_keep_the_gil() -> None:
    """A hash that lets the GIL go hands the spinner a turn and waits up to the switch interval
    to win it back (1.1 ms a call on 2 cores); held, the spinner runs only at the interval. A
    count of the spinner's turns, not a time: held, a tenth of the binding's or less."""
    buf = bytearray(os.urandom(76 * 1024))
    assert nogilhash.xxh3_128_hex(buf) == xxhash.xxh3_128_hexdigest(buf)
    assert nogilhash.xxh3_64_hex(buf) == xxhash.xxh3_64_hexdigest(buf)
    held = _spun(nogilhash.xxh3_128_hex, buf)
    handed = _spun(xxhash.xxh3_128_hexdigest, buf)  # the binding: a handoff per call
    assert held * 4 < handed, (held, handed)


def test_byte_views_are_taken_before_the_writers_start(tmp_path: Path, monkeypatch) -> None:
    threads: set[str] = set()
    real = writer.tensor_bytes

    def spy(t: torch.Tensor) -> memoryview:
        threads.add(threading.current_thread().name)
        return real(t)
    monkeypatch.setattr(writer, "tensor_bytes", spy)
    state = {f"t{i}": torch.randn(1000) for i in range(6)}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        state["t0"].add_(1)
        mgr.save(2, state)
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        mgr.load(out, step=2)
    assert threads and not any("write" in n for n in threads), threads
    assert all(torch.equal(out[k], state[k]) for k in state)
