"""Session 8 of issue 28: a resume from the local tier does not list and validate the persistent
tier first. Only step names are listed (on rank 0, while the holdings are surveyed), and the
persistent manifests are read only when a name is newer than the best local step, or when every
newer candidate failed and the fallback needs the older persistent steps. The decision is the
same: a newer persistent step still wins, and a fallback still reaches the persistent tier.
Real processes on gloo; an audit hook records every persistent manifest a rank opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tier_s8_targets as S
import tier_targets as T
from harness import run_ranks
from tier_helpers import NODES, _fast_ranks, rank_env  # noqa: F401 (an autouse fixture)

from shardckpt.format.shard import read_header
from shardckpt.storage import open_location
from shardckpt.tier.holdings import read_holdings

ENV = rank_env(60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1-7 through the manager: local steps 6 and 7 on both nodes, persistent step 5."""
    root = tmp_path_factory.mktemp("s8")
    run_ranks(T.manager_train, 4, str(root), NODES, list(range(1, 8)), env=ENV, timeout=150)
    return root


def copy_of(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    return root


def test_a_local_resume_reads_no_persistent_manifest(trained: Path, tmp_path: Path) -> None:
    root = copy_of(trained, tmp_path)
    out = run_ranks(S.resume_watching, 4, str(root), NODES, env=ENV, timeout=150)
    for rep in out:
        assert (rep["tier"], rep["step"], rep["exact"]) == ("local", 7, True), rep["warnings"]
        assert rep["opened"] == []  # persistent step 5 is older: never validated
        assert not [w for w in rep["warnings"] if w.startswith("restored")]


def test_a_newer_persistent_step_still_wins(trained: Path, tmp_path: Path) -> None:
    root = copy_of(trained, tmp_path)
    run_ranks(S.persistent_save, 4, str(root), 10, env=ENV, timeout=150)
    out = run_ranks(S.resume_watching, 4, str(root), NODES, env=ENV, timeout=150)
    for rep in out:
        assert (rep["tier"], rep["step"], rep["exact"]) == ("persistent", 10, True)
    assert "step-0000000010/manifest.json" in out[0]["opened"]  # validated: it is newer
    # nothing was skipped: no word (the local tier held step 7, older)
    assert not [w for w in out[0]["warnings"] if w.startswith("restored")]


def corrupt_rank_0(root: Path, step: int) -> None:
    """A flipped byte of tensor data in rank 0's largest file, on both nodes (its own copy and
    the peer copy): the holdings check passes, the load fails."""
    for node in ("0", "1"):
        holdings = read_holdings(open_location(str(root / node)), f"step-{step:010d}")
        name = max(holdings.ranks[0], key=lambda n: holdings.ranks[0][n].nbytes)
        path = root / node / f"step-{step:010d}" / name
        data = bytearray(path.read_bytes())
        header = read_header(lambda off, n, data=data: bytes(data[off:off + n]), len(data), name)
        chunk = max((c for p in header.pieces for c in p.chunks), key=lambda c: c.stored)
        data[chunk.offset + chunk.stored // 2] ^= 0x01
        path.write_bytes(bytes(data))


def test_every_local_step_failing_falls_back_to_the_older_persistent_step(
        trained: Path, tmp_path: Path) -> None:
    root = copy_of(trained, tmp_path)
    for step in (6, 7):
        corrupt_rank_0(root, step)
    out = run_ranks(S.resume_watching, 4, str(root), NODES, env=ENV, timeout=150)
    for rep in out:
        assert (rep["tier"], rep["step"], rep["exact"]) == ("persistent", 5, True)
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert warning.startswith("restored persistent step 5;")
    assert "local step 7" in warning and "local step 6" in warning
    assert "step-0000000005/manifest.json" in out[0]["opened"]  # listed once it was needed
