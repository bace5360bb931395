"""Issue 31: read-once load. Bytes several loading ranks need are read from storage by one of
them and sent to the others (shardckpt/engine/readonce.py).

Real gloo ranks (4 for DDP and HSDP, 2 against moto_server); states of a few MB. Byte counts
come from the load profile (``bytes_read`` from storage, ``bytes_received`` from peers) and,
for the kernel's view, from each process's own ``/proc/self/io``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import readonce_targets as T
from harness import run_ranks

from shardckpt import knobs
from shardckpt.engine.readunits import Unit, network_filesystem, plan_units, read_once_wanted
from shardckpt.storage import open_location

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "120"}


def test_ddp_4_ranks_read_each_byte_once(tmp_path: Path) -> None:
    ranks = run_ranks(T.ddp_load, 4, str(tmp_path), None, ("1", "0"), timeout=240, env=ENV)
    size = ranks[0]["size"]
    once = [r["loads"]["1"] for r in ranks]
    every = [r["loads"]["0"] for r in ranks]
    assert all(r["exact"] for r in once + every)
    total = sum(r["bytes_read"] for r in once)
    assert total <= 1.1 * size, (total, size)
    assert max(r["bytes_read"] for r in once) <= 0.4 * size, [r["bytes_read"] for r in once]
    # each rank got the rest from its peers, and read its own share from storage
    for r in once:
        assert r["bytes_read"] + r["bytes_received"] >= 0.95 * size
    # the kernel's count of what each process read (read(2) and friends: files, not the
    # gloo sockets, which use recv) agrees with bytes_read
    for r in once + every:
        assert abs(r["read_chars"] - r["bytes_read"]) <= 0.1 * r["bytes_read"], r
    # without read-once, every rank reads all of it
    assert sum(r["bytes_read"] for r in every) >= 3.5 * size
    assert all(r["bytes_received"] == 0 for r in every)


def test_hsdp_2x2_mesh_reads_each_byte_once(tmp_path: Path) -> None:
    ranks = run_ranks(T.hsdp_load, 4, str(tmp_path), timeout=240,
                      env={**ENV, "SHARDCKPT_READ_ONCE": "1"})
    size = ranks[0]["size"]
    assert all(r["exact"] for r in ranks)
    total = sum(r["bytes_read"] for r in ranks)
    assert total <= 1.1 * size, (total, size)
    assert all(r["bytes_received"] > 0 for r in ranks)  # each replica got half from the other


def test_s3_2_ranks_default_auto_reads_once(tmp_path: Path, s3) -> None:
    root = s3.new_root("readonce")
    ranks = run_ranks(T.ddp_load, 2, root, s3.storage_options, ("", "0"), timeout=240,
                      env={**ENV, "SHARDCKPT_READ_ONCE": ""})
    size = ranks[0]["size"]
    auto = [r["loads"][""] for r in ranks]
    off = [r["loads"]["0"] for r in ranks]
    assert all(r["exact"] for r in auto + off)
    assert sum(r["bytes_read"] for r in auto) <= 1.1 * size
    assert sum(r["bytes_read"] for r in off) >= 1.9 * size


def test_a_corrupt_chunk_read_for_the_others_fails_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(T.corrupt_shared, 4, str(tmp_path), timeout=240,
                      env={**ENV, "SHARDCKPT_READ_ONCE": "1"})
    name = ranks[0]["file"]
    for r in ranks:
        assert r["explicit"].startswith("CorruptLoadError"), r["explicit"]
        assert name in r["explicit"] and "checksum mismatch" in r["explicit"]
        assert r["fallback_step"] == 1 and r["fallback_exact"]


def test_plan_units_spreads_readers_by_bytes_and_merges_overlaps() -> None:
    # 4 ranks all read file 0 (8 pieces of 100..800 bytes, whole); rank 3 also reads file 1 alone
    sizes = [3600, 5000]
    files_of = [[0], [0], [0], [0, 1]]
    spans = [[[0, p, 0, 100 * (p + 1)] for p in range(8)] for _ in range(4)]
    units, load = plan_units(4, sizes, files_of, spans)
    assert len(units) == 8 and all(sorted(u.spans) == [0, 1, 2, 3] for u in units)
    assert load[3] >= 5000 and max(load[:3]) <= 1300  # rank 3's own file counts against it
    assert sum(u.hi - u.lo for u in units) == 3600  # each byte read once
    # resharded boxes: overlapping spans of one piece share a unit, disjoint ones do not
    units, load = plan_units(3, [1000], [[0], [0], [0]],
                             [[[0, 0, 0, 400]], [[0, 0, 300, 600]], [[0, 0, 700, 1000]]])
    assert units == [Unit(0, 0, 0, 600, units[0].reader, {0: (0, 400), 1: (300, 600)})]
    assert load[2] == 300 and sum(load) == 900


def test_auto_is_off_on_a_local_disk_on_for_object_stores(tmp_path: Path, monkeypatch,
                                                          s3) -> None:
    local = open_location(str(tmp_path))
    monkeypatch.delenv("SHARDCKPT_READ_ONCE", raising=False)
    assert knobs.READ_ONCE.get() == "auto"
    assert network_filesystem(str(tmp_path)) is None
    assert not read_once_wanted([local])
    remote = open_location(s3.new_root("auto"), s3.options)
    assert read_once_wanted([remote])
    monkeypatch.setenv("SHARDCKPT_READ_ONCE", "1")
    assert read_once_wanted([local])
    monkeypatch.setenv("SHARDCKPT_READ_ONCE", "0")
    assert not read_once_wanted([remote])
    monkeypatch.setenv("SHARDCKPT_READ_ONCE", "yes")
    with pytest.raises(ValueError, match="SHARDCKPT_READ_ONCE"):
        knobs.READ_ONCE.get()
