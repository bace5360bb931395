"""Issue 28's node-loss acceptance with RNG capture on (session 8). The job of
tests/test_tier_acceptance.py (2 torchrun agents x 2 workers, FSDP2, local every step,
persistent every 5, node 1's path deleted after step 7), with managers that capture the RNG
streams and a training loop that draws from the global torch stream, seeded alike on every
rank. The persistent tier writes that equal state once; the local tier writes it on every rank
(planning/localcopies.py), so node 1's ranks receive exactly their own files: ``bytes_received``
equals their files' size. The resumed job starts at step 7 and continues bit-identically (it
would not without the RNG restored), and no worker opens another node's path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import TESTS_DIR
from test_tier_acceptance import assert_continues_exactly, own_files_bytes
from test_tier_torchrun import run_nodes

from shardckpt import catalog
from shardckpt.extras import RNG_KEY
from shardckpt.storage import open_location

SCRIPT = TESTS_DIR / "tier_s8_rng_script.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("s8rng") / "run"
    root.mkdir()
    out = run_nodes("train", root, script=SCRIPT, timeout=240)
    assert [r["node"] for r in out] == ["0", "0", "1", "1"]
    return root, out


def rng_entries(root: Path, step: int) -> dict[str, catalog.M.TensorEntry]:
    manifest = catalog.read_manifest(open_location(str(root)), step)
    return {k: e for k, e in manifest.tensors.items() if k.startswith(RNG_KEY + "/")}


def test_the_tiers_write_the_equal_rng_state_once_and_on_every_rank(
        trained: tuple[Path, list[dict]]) -> None:
    root = trained[0]
    persistent, local = rng_entries(root / "persistent", 5), rng_entries(root / "0", 7)
    torch_key = f"{RNG_KEY}/torch"  # seeded alike on every rank: one writer, persistently
    assert persistent[torch_key].meta is not None and len(persistent[torch_key].meta.writers) == 1
    assert local.keys() == persistent.keys()
    assert all(e.per_rank is not None for e in local.values())  # each rank's own copy


def test_node_loss_with_rng_capture_receives_exactly_node_1_s_files(
        trained: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(trained[0], root)
    shutil.rmtree(root / "1")  # node 1 was replaced: its local path is gone
    sizes = {r: own_files_bytes(root, "0", 7, r) for r in range(4)}
    out = run_nodes("resume", root, script=SCRIPT, timeout=240)
    assert [r["tier"] for r in out] == ["local"] * 4
    assert_continues_exactly(out, trained[1], 7)  # the global stream was restored
    assert [r["bytes_received"] for r in out] == [0, 0, sizes[2], sizes[3]]
    assert not [w for w in out[0]["warnings"] if w.startswith("restored")]
