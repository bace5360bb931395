"""Restoring across tiers (issue 28): the newest step recoverable from the node-local tier
(own files, else received from a peer node over the process group) or the persistent one,
agreed by every rank, with fallback when a restore fails. Real processes, real gloo; an audit
hook in every worker fails any open() under another node's path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tier_targets as T
from harness import run_ranks
from tier_helpers import NODES, _fast_ranks, rank_env  # noqa: F401 (an autouse fixture)

from shardckpt import catalog
from shardckpt.format.shard import read_header
from shardckpt.storage import open_location
from shardckpt.tier.holdings import read_holdings

ENV = rank_env(30)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1-3 saved locally (2 x 2 ranks, 2 copies), step 2 persistently too."""
    root = tmp_path_factory.mktemp("saved")
    run_ranks(T.save_both, 4, str(root), NODES, [1, 2, 3], 2, env=ENV, timeout=120)
    return root


def fresh_copy(saved: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(saved, root)
    return root


def files_of(root: Path, node: str, step: int, ranks: set[int]) -> int:
    holdings = read_holdings(open_location(str(root / node)), f"step-{step:010d}")
    return sum(f.nbytes for r in ranks for f in holdings.ranks[r].values())


def test_a_replaced_node_receives_its_files_from_its_peer(saved: Path, tmp_path: Path) -> None:
    root = fresh_copy(saved, tmp_path)
    shutil.rmtree(root / "1")  # node 1 was replaced: its local path is gone
    out = run_ranks(T.recover_job, 4, str(root), NODES, env=ENV, timeout=120)
    for rep in out:
        assert (rep["tier"], rep["step"], rep["exact"]) == ("local", 3, True)
        assert rep["sources"] == ["0", "0", "0", "0"]
        assert not any("audit" in w for w in rep["warnings"])
    assert out[0]["bytes_received"] == out[1]["bytes_received"] == 0
    # node 1 received exactly the files its ranks read, from node 0: their own only (a local
    # save writes the small tensor every rank holds alike on every rank: planning/localcopies)
    manifest = catalog.read_manifest(open_location(str(root / "0")), 3)
    assert manifest.tensors["shared"].per_rank is not None
    needed = {2, 3}
    assert out[2]["bytes_received"] > 0 and out[3]["bytes_received"] > 0
    assert out[2]["bytes_received"] + out[3]["bytes_received"] == files_of(root, "0", 3, needed)
    assert all(rep["bytes_read"] > 0 for rep in out)
    assert not any(w.startswith("restored") for w in out[0]["warnings"])  # the newest: no word


def recover_rank_2_from_node_0(root: Path) -> list[dict]:
    """The 4-rank recovery, node 1's copy of rank 2's files being bad: local step 3 restored
    exactly, rank 2 receiving exactly its files from node 0 (the second holder)."""
    out = run_ranks(T.recover_job, 4, str(root), NODES, env=ENV, timeout=120)
    for rep in out:
        assert (rep["tier"], rep["step"], rep["exact"]) == ("local", 3, True)
        assert rep["sources"] == ["0", "0", "0", "1"]
    assert [r["bytes_received"] for r in out] == [0, 0, files_of(root, "0", 3, {2}), 0]
    return out


def test_a_damaged_copy_is_fetched_from_the_second_holder(saved: Path, tmp_path: Path) -> None:
    """Both nodes are there, but node 1's own copy of rank 2's files fails its holdings check:
    the plan takes node 0's copy, and rank 2 receives exactly its files from there."""
    root = fresh_copy(saved, tmp_path)
    holdings = read_holdings(open_location(str(root / "1")), "step-0000000003")
    name = sorted(holdings.ranks[2])[0]
    path = root / "1" / "step-0000000003" / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the trailer: the header can no longer be found
    path.write_bytes(bytes(data))
    out = recover_rank_2_from_node_0(root)
    assert path.read_bytes() == (root / "0" / "step-0000000003" / name).read_bytes()
    assert not any(w.startswith("restored") for w in out[0]["warnings"])


def test_a_copy_with_damaged_data_is_replaced_from_the_second_holder(saved: Path,
                                                                    tmp_path: Path) -> None:
    """Node 1's own copy of rank 2's files has a flipped byte of tensor data (its header checks
    out): the load finds it, every rank checks the copies it provided in full, and the same
    step is restored again with rank 2's files from node 0; never an older step."""
    root = fresh_copy(saved, tmp_path)
    holdings = read_holdings(open_location(str(root / "1")), "step-0000000003")
    name = max(holdings.ranks[2], key=lambda n: holdings.ranks[2][n].nbytes)
    path = root / "1" / "step-0000000003" / name
    data = bytearray(path.read_bytes())
    header = read_header(lambda off, n: bytes(data[off:off + n]), len(data), name)
    chunk = max((c for p in header.pieces for c in p.chunks), key=lambda c: c.stored)
    data[chunk.offset + 3] ^= 0x01
    path.write_bytes(bytes(data))
    out = recover_rank_2_from_node_0(root)
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert warning.startswith("restored local step 3;") and name in warning
    assert "restored from the other copies of the bad files" in warning


def test_the_audit_hook_catches_a_read_of_another_node_s_path(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "x").write_bytes(b"x")
    (out,) = run_ranks(T.open_other_node, 1, str(tmp_path), env=ENV, timeout=60, init_pg=False)
    assert out.startswith("PermissionError: audit: worker on node 0 opened")
    assert out.endswith("/1/x")


def test_a_corrupt_surviving_copy_falls_back_to_an_older_step(saved: Path,
                                                               tmp_path: Path) -> None:
    root = fresh_copy(saved, tmp_path)
    shutil.rmtree(root / "1")
    holdings = read_holdings(open_location(str(root / "0")), "step-0000000003")
    name = max(holdings.ranks[2], key=lambda n: holdings.ranks[2][n].nbytes)
    path = root / "0" / "step-0000000003" / name
    data = bytearray(path.read_bytes())
    data[200] ^= 0x01  # a chunk byte: the header still checks out
    path.write_bytes(bytes(data))
    out = run_ranks(T.recover_job, 4, str(root), NODES, env=ENV, timeout=120)
    assert [(r["tier"], r["step"], r["exact"]) for r in out] == [("local", 2, True)] * 4
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert "restored local step 2" in warning and name in warning
    # step 3 belongs to the timeline the job abandoned: gone from every node
    assert sorted(p.name for p in (root / "0").glob("step-*")) == ["step-0000000001",
                                                                   "step-0000000002"]


def test_both_copies_lost_falls_back_to_the_persistent_tier(saved: Path,
                                                            tmp_path: Path) -> None:
    root = fresh_copy(saved, tmp_path)
    shutil.rmtree(root / "0")
    shutil.rmtree(root / "1")
    out = run_ranks(T.recover_job, 4, str(root), NODES, env=ENV, timeout=120)
    assert [(r["tier"], r["step"], r["exact"]) for r in out] == [("persistent", 2, True)] * 4
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert warning.endswith("the local tier holds no recoverable step")


def test_another_world_size_skips_the_local_tier_naming_the_reason(saved: Path,
                                                                   tmp_path: Path) -> None:
    root = fresh_copy(saved, tmp_path)
    out = run_ranks(T.recover_job, 2, str(root), ["0", "1"], env=ENV, timeout=120)
    assert [(r["tier"], r["step"]) for r in out] == [("persistent", 2)] * 2
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert "local step 3: saved at world size 4, this job has 2" in warning
