"""Session 10: the small-chunk path of incremental saves.

* format/nogilhash.py: buffers from HELD_MIN to MIN_BYTES are hashed through the C entry points
  with the GIL held (the binding lets it go from 64 KiB, and winning it back behind a thread
  running Python costs up to the switch interval);
* engine/writer.py: the pieces' byte views are taken by the thread that calls write_rank, never
  by a file writer; a lazily conjugated or negated tensor is saved by its values in a blocking
  save too (it raised ValueError from the write phase: fresh-clone trial, session 10).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest
import torch
import xxhash

import shardckpt
from shardckpt.engine import writer
from shardckpt.format import nogilhash


def test_mid_sized_hashes_keep_the_gil() -> None:
    """From HELD_MIN to MIN_BYTES the hash goes through a ``PyDLL`` entry point (ctypes keeps
    the GIL for it: no handoff); from MIN_BYTES on through a ``CDLL`` one (released); the
    values are the binding's. (A timing of the handoff itself depends on the host's load: the
    flags are what decides it.)"""
    for n, held in ((nogilhash.HELD_MIN, True), (76 * 1024, True),
                    (nogilhash.MIN_BYTES - 1, True), (nogilhash.MIN_BYTES, False)):
        buf = bytearray(os.urandom(n))
        for which in (0, 1):  # XXH3-64, XXH3-128
            found = nogilhash._entry(buf, which)
            assert found is not None, n
            assert bool(found[0]._flags_ & ctypes._FUNCFLAG_PYTHONAPI) == held, n
        assert nogilhash.xxh3_64_hex(buf) == xxhash.xxh3_64_hexdigest(buf)
        assert nogilhash.xxh3_128_hex(buf) == xxhash.xxh3_128_hexdigest(buf)
    assert nogilhash._entry(bytearray(nogilhash.HELD_MIN - 1), 1) is None  # the binding


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


@pytest.mark.parametrize("incremental", [False, True])
def test_a_blocking_save_takes_conjugate_and_negative_views_by_value(tmp_path: Path,
                                                                    incremental: bool) -> None:
    torch.manual_seed(0)
    z = torch.randn(3000, dtype=torch.complex64)
    state = {"conj": z.conj(), "neg": torch._neg_view(torch.randn(3000)),
             "imag1": torch.randn(1, dtype=torch.complex64).conj().imag, "plain": torch.ones(4)}
    assert state["conj"].is_conj() and state["neg"].is_neg() and state["imag1"].is_neg()
    want = {k: v.resolve_conj().resolve_neg().clone() for k, v in state.items()}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False, incremental=incremental,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        state["neg"] = torch._neg_view(torch.randn(3000))  # a new lazy view in the next step
        want["neg"] = state["neg"].resolve_neg().clone()
        mgr.save(2, state)
        out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
        mgr.load(out, step=2)
    for k in want:  # the values (no NaN here), not the stored bytes of the lazy view
        assert torch.equal(out[k], want[k]), k


def test_a_load_that_finds_no_good_step_names_every_step_it_tried(tmp_path: Path) -> None:
    """From the session 10 trial: the error named only the oldest step; the others were in
    warnings alone."""
    from shardckpt.engine.load import CorruptLoadError

    with shardckpt.CheckpointManager(str(tmp_path), async_save=False,
                                     capture_rng=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((1000,), float(step))})
    for shard in tmp_path.glob("step-*/*.shard"):
        data = bytearray(shard.read_bytes())
        data[100] ^= 0xFF  # inside the first chunk (it starts right after the 64-byte preamble)
        shard.write_bytes(bytes(data))
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False,
                                     capture_rng=False) as mgr:
        with pytest.warns(UserWarning, match="cannot be loaded"), \
                pytest.raises(CorruptLoadError, match=r"steps 3, 2, 1 \(newest first\)"):
            mgr.load({"w": torch.zeros(1000)})
