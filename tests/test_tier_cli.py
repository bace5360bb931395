"""``shardckpt ls`` / ``verify`` on a node's local path (issue 28): its local steps, the ranks
it holds (own or peer copy) and their health judged against ``holdings.json``; ``verify``
checks every byte of one step's holdings. Exit codes as in ``shared/INTERFACE.md``: 0 all
well, 2 an integrity problem, 64 a usage error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.format.shard import read_header
from shardckpt.storage import open_location
from shardckpt.tier.holdings import read_holdings


@pytest.fixture()
def node(tmp_path: Path) -> Path:
    """A one-process job's local tier: steps 1-3 on node "solo" (steps 2 and 3 kept), and its
    persistent root (step 3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-node warning
        mgr = shardckpt.CheckpointManager(
            str(tmp_path / "persistent"), save_every=3, async_save=False, capture_rng=False,
            local=shardckpt.LocalTier(str(tmp_path / "{node}"), every=1, copies=1, keep=2,
                                      node="solo"))
    with mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((4000,), float(step)), "b": torch.ones(7)})
    return tmp_path / "solo"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def the_file(path: Path, step: int) -> Path:
    holdings = read_holdings(open_location(str(path)), f"step-{step:010d}")
    name = max(holdings.ranks[0], key=lambda n: holdings.ranks[0][n].nbytes)
    return path / f"step-{step:010d}" / name


def test_ls_of_a_node_path_lists_its_holdings_and_their_health(
        node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", str(node), "--json")
    rows = json.loads(out)
    assert code == 0
    assert [(r["step"], r["node"], r["health"]) for r in rows] == [(2, "solo", "ok"),
                                                                   (3, "solo", "ok")]
    assert [(x["rank"], x["copy"], x["health"]) for x in rows[1]["ranks"]] == [(0, "own", "ok")]
    code, out, _ = run(capsys, "ls", str(node))
    assert code == 0 and "0:own" in out and "solo" in out
    # the persistent root is still listed as a checkpoint root
    code, out, _ = run(capsys, "ls", str(node.parent / "persistent"), "--json")
    assert code == 0 and [r["step"] for r in json.loads(out)] == [3]
    # a damaged file and a step without holdings (a save that did not finish)
    victim = the_file(node, 3)
    victim.write_bytes(victim.read_bytes()[:-1])
    (node / "step-0000000002" / "holdings.json").unlink()
    code, out, err = run(capsys, "ls", str(node), "--json")
    rows = json.loads(out)
    assert code == 2
    assert [(r["step"], r["health"]) for r in rows] == [(2, "incomplete"), (3, "damaged")]
    assert victim.name in rows[1]["ranks"][0]["health"] and victim.name in err


def test_verify_of_a_node_path_checks_every_byte_it_holds(
        node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", str(node), "--json")
    doc = json.loads(out)
    assert (code, doc["step"], doc["node"], doc["ok"]) == (0, 3, "solo", True)
    assert [(r["rank"], r["copy"], r["health"]) for r in doc["ranks"]] == [(0, "own", "ok")]
    code, out, _ = run(capsys, "verify", str(node), "--step", "2")
    assert code == 0 and "local step 2 on node solo" in out
    # a flipped byte of tensor data: sizes and headers still fit (ls sees nothing) ...
    victim = the_file(node, 3)
    data = bytearray(victim.read_bytes())
    header = read_header(lambda off, n: bytes(data[off:off + n]), len(data), victim.name)
    chunk = max((c for p in header.pieces for c in p.chunks), key=lambda c: c.stored)
    data[chunk.offset + 1] ^= 0x10
    victim.write_bytes(bytes(data))
    assert run(capsys, "ls", str(node))[0] == 0
    # ... verify reads every chunk
    code, out, _ = run(capsys, "verify", str(node), "--step", "3", "--json")
    doc = json.loads(out)
    assert code == 2 and not doc["ok"]
    assert "checksum mismatch" in doc["ranks"][0]["health"]
    assert victim.name in doc["ranks"][0]["health"]
    code, _, err = run(capsys, "verify", str(node), "--step", "1")
    assert code == 2 and "step-0000000001" in err  # retention deleted it: no holdings
    code, _, err = run(capsys, "verify", str(node), "--model", "m:f")
    assert code == 64 and "node's local path" in err
