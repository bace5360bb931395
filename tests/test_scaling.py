"""Issue 10: metadata grows no more than linearly with ranks, a loading rank reads only what
concerns it, and a single process loads any subset of a 16-rank checkpoint.

Real gloo processes (2 and 16 ranks) save FSDP-style ``Shard(0)`` DTensors with the same data per
rank, through the workload of ``benchmarks/scaling.py`` (which measures the same at larger
sizes, see ``docs/scaling.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import run_ranks

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # spawned ranks inherit sys.path, so they can import it too
import scaling  # noqa: E402

TENSORS, ROWS, COLS = 60, 2, 8
STEP_DIR = "step-0000000001"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    out = {}
    for world in (2, 16):
        root = tmp_path_factory.mktemp(f"world{world}")
        ranks = run_ranks(scaling.rank_main, world, str(root), TENSORS, ROWS, COLS,
                          timeout=240.0)
        out[world] = {"root": str(root), "ranks": ranks,
                      "meta": scaling.metadata_bytes(root / STEP_DIR)}
    return out


def test_save_and_load_at_each_world_size_are_exact(saved: dict[int, dict[str, Any]]) -> None:
    for world, run in saved.items():
        assert len(run["ranks"]) == world
        assert [r["mismatches"] for r in run["ranks"]] == [[]] * world


def test_metadata_grows_no_more_than_linearly(saved: dict[int, dict[str, Any]]) -> None:
    small, big = saved[2]["meta"], saved[16]["meta"]
    factor = 16 / 2
    assert big["files"] == factor * small["files"]
    assert big["metadata_bytes"] <= factor * small["metadata_bytes"], (small, big)
    assert big["manifest_bytes"] <= factor * small["manifest_bytes"], (small, big)
    # the tensor directory does not grow with ranks: FSDP writers are one run [0, world)
    doc = json.loads(Path(saved[16]["root"], STEP_DIR, "manifest.json").read_bytes()
                     .rsplit(b',"checksum"', 1)[0] + b"}")
    entry = doc["tensors"][scaling.tensor_key(0)]
    assert entry == {"dtype": "float32", "shape": [16 * ROWS, COLS], "ranks": [[0, 16]]}


def test_a_loading_rank_reads_only_its_own_headers(saved: dict[int, dict[str, Any]]) -> None:
    for world, run in saved.items():
        files_per_rank = run["meta"]["files"] // world
        assert {r["headers_read"] for r in run["ranks"]} == {files_per_rank}, world


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (TENSORS, 2)])
def test_one_process_loads_any_subset_of_a_16_rank_checkpoint(
        saved: dict[int, dict[str, Any]], n: int, seed: int) -> None:
    got = scaling.subset_load(saved[16]["root"], 16, TENSORS, ROWS, COLS, n, seed)
    assert got["tensors"] == n and got["mismatches"] == []
    assert got["headers_read"] == saved[16]["meta"]["files"]  # every writer holds a row block


def test_a_subset_of_rows_reads_only_the_writers_of_those_rows(
        saved: dict[int, dict[str, Any]]) -> None:
    """Resharding 16 -> 1 rank's box: a box inside one writer's rows needs one rank's headers."""
    import shardckpt
    from shardckpt.engine.index import PieceIndex
    from shardckpt.engine.reader import CheckpointReader

    with shardckpt.CheckpointManager(saved[16]["root"]) as mgr:
        manifest = mgr.manifest(1)
        reader = CheckpointReader(mgr.locations, STEP_DIR, manifest)
        index = PieceIndex(reader)
        key = scaling.tensor_key(3)
        meta = manifest.resolve(key)
        assert meta is not None
        found = index.meta_for(meta, key, (5 * ROWS, 0), (ROWS, COLS))  # rank 5's rows
        assert [p.offsets for p in found.pieces] == [(5 * ROWS, 0)]
        assert index.headers_read == saved[16]["meta"]["files"] // 16
