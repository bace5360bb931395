"""Issue 28's acceptance, with real processes: an FSDP2 job of 4 ranks on 2 simulated nodes (two
``torchrun --nnodes 2 --node-rank i`` agents on 127.0.0.1, static rendezvous) saves locally
every step and persistently every 5. After step 7 has committed locally, node 1's local path is
deleted (a replaced machine). The resumed job starts at step 7, not 5, its node-1 ranks
receiving exactly their own files from node 0 over the process group, and continues
bit-identically to the uninterrupted run; an audit hook in every worker fails any open() under
another node's path. With a corrupt byte in the surviving copy of a node-1 rank's step-7 file,
the job resumes from local step 6 instead, the warning naming the file. A node killed in the
middle of a local save leaves the previous local step restorable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tier_targets as T
from harness import TESTS_DIR, RankFailures, run_ranks
from test_tier_torchrun import run_nodes

from shardckpt.format.shard import read_header
from shardckpt.storage import open_location
from shardckpt.tier.holdings import read_holdings

SCRIPT = TESTS_DIR / "tier_acceptance_script.py"
ENV = {"OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": "20"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The uninterrupted run (steps 1-10; saved at 1-7): its root and each rank's result."""
    root = tmp_path_factory.mktemp("acceptance") / "run"
    root.mkdir()
    out = run_nodes("train", root, script=SCRIPT, timeout=240)
    assert [r["node"] for r in out] == ["0", "0", "1", "1"]
    for node in ("0", "1"):  # keep=2 locally; persistent every 5
        assert sorted(p.name for p in (root / node).glob("step-*")) == [
            "step-0000000006", "step-0000000007"]
    assert sorted(p.name for p in (root / "persistent").glob("step-*")) == ["step-0000000005"]
    return root, out


def lose_node_1(trained: tuple[Path, list[dict]], tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(trained[0], root)
    shutil.rmtree(root / "1")  # node 1 was replaced: its local path is gone
    return root


def own_files_bytes(root: Path, node: str, step: int, rank: int) -> int:
    holdings = read_holdings(open_location(str(root / node)), f"step-{step:010d}")
    return sum(f.nbytes for f in holdings.ranks[rank].values())


def assert_continues_exactly(out: list[dict], uninterrupted: list[dict], start: int) -> None:
    for rank, (got, want) in enumerate(zip(out, uninterrupted)):
        assert (got["start"], got["state_step"]) == (start, start), got["warnings"]
        assert got["losses"] == {s: want["losses"][s] for s in got["losses"]}, rank
        assert sorted(map(int, got["losses"])) == list(range(start + 1, 11))
        assert got["digest"] == want["digest"], rank  # shards and momentum, bit for bit
        assert not any("audit" in w for w in got["warnings"])


def test_node_loss_resumes_from_local_step_7_receiving_node_1_s_files(
        trained: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root = lose_node_1(trained, tmp_path)
    sizes = {r: own_files_bytes(root, "0", 7, r) for r in range(4)}  # node 0's copies
    out = run_nodes("resume", root, script=SCRIPT, timeout=240)
    assert [r["tier"] for r in out] == ["local"] * 4
    assert_continues_exactly(out, trained[1], 7)
    # node 1's ranks received exactly their own files, from node 0; node 0's ranks nothing
    assert [r["bytes_received"] for r in out] == [0, 0, sizes[2], sizes[3]]
    assert all(r["bytes_read"] > 0 for r in out)
    assert not [w for w in out[0]["warnings"] if w.startswith("restored")]
    # the resumed job saved on: node 1's path is back, with its own and the peer copies
    holdings = read_holdings(open_location(str(root / "1")), "step-0000000010")
    assert sorted(holdings.ranks) == [0, 1, 2, 3]


def test_a_corrupt_surviving_copy_resumes_from_the_newest_step_that_verifies(
        trained: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root = lose_node_1(trained, tmp_path)
    holdings = read_holdings(open_location(str(root / "0")), "step-0000000007")
    name = max(holdings.ranks[2], key=lambda n: holdings.ranks[2][n].nbytes)
    path = root / "0" / "step-0000000007" / name
    data = bytearray(path.read_bytes())
    header = read_header(lambda off, n: bytes(data[off:off + n]), len(data), name)
    chunk = max((c for p in header.pieces for c in p.chunks), key=lambda c: c.stored)
    data[chunk.offset + chunk.stored // 2] ^= 0x01  # tensor data: size and header still fit
    path.write_bytes(bytes(data))
    out = run_nodes("resume", root, script=SCRIPT, timeout=240)
    assert [r["tier"] for r in out] == ["local"] * 4
    assert_continues_exactly(out, trained[1], 6)  # never a mix: every key from step 6
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert "restored local step 6" in warning and "local step 7" in warning and name in warning


@pytest.fixture()
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


@pytest.mark.usefixtures("_fast_ranks")
def test_a_node_killed_mid_local_save_leaves_the_previous_step_restorable(
        tmp_path: Path) -> None:
    nodes = ["0", "0", "1", "1"]
    with pytest.raises(RankFailures):  # rank 3 (node 1) dies in step 3's peer copy
        run_ranks(T.local_saves, 4, str(tmp_path), nodes, [1, 2, 3], 2, 3, kill_at=3,
                  env=ENV, timeout=120)
    out = run_ranks(T.recover_job, 4, str(tmp_path), nodes, env=ENV, timeout=120)
    assert [(r["tier"], r["step"], r["exact"]) for r in out] == [("local", 2, True)] * 4
    assert [r["bytes_received"] for r in out] == [0] * 4  # each node held its own
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert "local step 3" in warning and "incomplete" in warning


def test_the_cli_shows_a_node_s_own_and_peer_copies(trained: tuple[Path, list[dict]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from shardckpt.cli.main import main

    assert main(["ls", str(trained[0] / "1"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["node"], r["health"]) for r in rows] == [(6, "1", "ok"), (7, "1", "ok")]
    assert [(x["rank"], x["copy"]) for x in rows[1]["ranks"]] == [
        (0, "peer"), (1, "peer"), (2, "own"), (3, "own")]
    assert main(["verify", str(trained[0] / "1"), "--step", "7", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and [r["health"] for r in doc["ranks"]] == ["ok"] * 4
