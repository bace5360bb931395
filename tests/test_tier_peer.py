"""Peer copies over a process group (shardckpt.engine.peer, issue 28): real gloo groups of 2-4
ranks in separate processes; every chunk is checked against its XXH3 on arrival."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tier_targets as T
from harness import run_ranks

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


def expected_size(rank: int) -> int:
    return sum(len(T.file_bytes(rank, i)) for i in range(3))


def check_copy(root: Path, node: str, rank: int) -> None:
    for i, name in enumerate(T.names_of(rank)):
        assert (root / f"node{node}" / T.STEP_DIR / name).read_bytes() == T.file_bytes(rank, i)


def test_each_rank_s_files_reach_its_peer_node(tmp_path: Path) -> None:
    nodes = ["0", "0", "1", "1"]
    out = run_ranks(T.push_to_peers, 4, str(tmp_path), nodes, 2, 1000, env=ENV, timeout=90)
    for rank, rep in enumerate(out):
        assert rep["errors"] == []
        assert rep["sent"] == expected_size(rank)
        sender = {0: 2, 1: 3, 2: 0, 3: 1}[rank]  # the copies spread over the peer's ranks
        assert rep["received"] == expected_size(sender)
        assert sorted(rep["files"]) == T.names_of(sender)
    for rank in range(4):
        check_copy(tmp_path, "0", rank)
        check_copy(tmp_path, "1", rank)


def test_three_nodes_two_copies(tmp_path: Path) -> None:
    nodes = ["a", "b", "c"]
    out = run_ranks(T.push_to_peers, 3, str(tmp_path), nodes, 2, 4096, env=ENV, timeout=90)
    assert all(rep["errors"] == [] for rep in out)
    for rank, node in enumerate(nodes):
        check_copy(tmp_path, node, rank)
        nxt = nodes[(rank + 1) % 3]
        check_copy(tmp_path, nxt, rank)
        third = nodes[(rank + 2) % 3]
        assert not (tmp_path / f"node{third}" / T.STEP_DIR / T.names_of(rank)[0]).exists()


def test_a_chunk_damaged_on_the_wire_is_caught_on_arrival(tmp_path: Path) -> None:
    nodes = ["0", "0", "1", "1"]
    bad = T.names_of(0)[0]
    out = run_ranks(T.push_to_peers, 4, str(tmp_path), nodes, 2, 1000, corrupt=bad, env=ENV,
                    timeout=90)
    (error,) = out[2]["errors"]  # rank 0's copies go to rank 2
    assert f"{T.STEP_DIR}/{bad}: chunk at offset 0 from rank 0 failed its XXH3 check" in error
    assert not (tmp_path / "node1" / T.STEP_DIR / bad).exists()  # never left half-written
    # the rest of the stream, and every other transfer, went through
    assert sorted(out[2]["files"]) == T.names_of(0)[1:]
    assert all(out[r]["errors"] == [] for r in (0, 1, 3))
    check_copy(tmp_path, "1", 1)


def test_a_file_the_sender_lacks_is_reported_by_the_receiver(tmp_path: Path) -> None:
    nodes = ["0", "1"]
    gone = T.names_of(1)[2]
    out = run_ranks(T.push_to_peers, 2, str(tmp_path), nodes, 2, 1000, missing=gone, env=ENV,
                    timeout=90)
    (error,) = out[0]["errors"]
    assert "rank 1 could not send" in error and gone in error and "missing" in error
    assert out[0]["files"] == {}
    (sender_error,) = out[1]["errors"]
    assert sender_error.endswith(f"node1/{T.STEP_DIR}/{gone}: missing")
    check_copy(tmp_path, "1", 0)  # the other direction went through


def test_transfers_in_a_cycle_do_not_deadlock(tmp_path: Path) -> None:
    out = run_ranks(T.cycle, 3, str(tmp_path), 777, env=ENV, timeout=90)
    assert [sorted(r["received"]) for r in out] == [T.names_of(2), T.names_of(0),
                                                    sorted(T.names_of(0) + T.names_of(1))]
    assert all(r["errors"] == [] for r in out)
    for src, dst in [(0, 1), (1, 2), (2, 0), (0, 2)]:
        for i, name in enumerate(T.names_of(src)):
            assert (tmp_path / f"r{dst}" / T.STEP_DIR / name).read_bytes() == \
                T.file_bytes(src, i)
