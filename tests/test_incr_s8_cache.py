"""Incremental saves, session 8: the next save of a process takes its base's chunk table and
manifest from what this process wrote and committed (engine/incremental.py), never from a
step that was replaced, pruned or whose bytes went missing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from incremental_helpers import assert_bit_equal, load_step, lora_state

import shardckpt
from shardckpt.cli.main import main
from shardckpt.engine import incremental as inc
from shardckpt.storage import open_location, step_dirname

CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(CHUNK))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the incremental module read from storage to learn a base: manifests parsed and
    shard headers checked."""
    seen: list[str] = []
    real_manifest, real_reader = inc.read_manifest, inc.CheckpointReader

    def read_manifest(location: Any, step: int) -> Any:
        seen.append(f"manifest {step}")
        return real_manifest(location, step)

    def reader(location: Any, step_dir: str, manifest: Any) -> Any:
        seen.append(f"headers {step_dir}")
        return real_reader(location, step_dir, manifest)

    monkeypatch.setattr(inc, "read_manifest", read_manifest)
    monkeypatch.setattr(inc, "CheckpointReader", reader)
    return seen


def extra_state(step: int, seed: int) -> dict[str, Any]:
    """The LoRA state plus a tensor that first appears at step 3 (so its bytes lie in step 3's
    own files) and stays the same afterwards."""
    state = lora_state(step)
    if step >= 3:
        state["extra"] = torch.randn(64, 512, generator=torch.Generator().manual_seed(seed))
    return state


def test_later_saves_take_the_base_from_what_the_process_wrote(
        tmp_path: Path, reads: list[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        infos = [mgr.save(s, lora_state(s)).wait() for s in range(1, 6)]
    assert reads == []  # no manifest parsed, no header read: the tables were this process's
    assert [i.depends_on for i in infos] == [(), (1,), (1,), (1,), (1,)]  # no chains
    for i in infos[1:]:
        assert i.bytes_referenced > 0 and i.nbytes < 0.5 * infos[0].nbytes
    for s in range(1, 6):
        load_step(root, s, lora_state(s))
    assert main(["verify", root]) == 0


def test_a_base_replaced_by_another_jobs_commit_is_read_again(
        tmp_path: Path, reads: list[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, extra_state(s, seed=7))
        # another job replaces step 3: same step, same file names, other bytes and save id
        shutil.rmtree(Path(root) / step_dirname(3))
        with shardckpt.CheckpointManager(root, async_save=False) as other:
            other.save(3, extra_state(3, seed=8))
        reads.clear()
        info = mgr.save(4, extra_state(4, seed=7)).wait()
    assert "manifest 3" in reads and f"headers {step_dirname(3)}" in reads, reads
    assert 3 in info.depends_on  # the frozen base, as step 3 of the other job holds it
    load_step(root, 4, extra_state(4, seed=7))  # a stale table would point into the new file
    load_step(root, 3, extra_state(3, seed=8))
    assert main(["verify", root, "--step", "4"]) == 0


def test_a_base_pruned_away_is_not_taken_from_the_cache(tmp_path: Path,
                                                        reads: list[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in (1, 2):
            mgr.save(s, lora_state(s))
        with shardckpt.CheckpointManager(root, async_save=False) as other:
            other.save(3, lora_state(3))  # another job's full step
        with shardckpt.CheckpointManager(
                root, async_save=False,
                retention=shardckpt.RetentionPolicy(keep_last=1)) as pruner:
            pruner.prune()
            assert pruner.steps() == [3]
        assert not (Path(root) / step_dirname(2)).exists()
        reads.clear()
        info = mgr.save(4, lora_state(4)).wait()
    assert info.depends_on == (3,) and "manifest 3" in reads
    load_step(root, 4, lora_state(4))
    assert main(["verify", root, "--step", "4"]) == 0


def test_a_cached_table_whose_holder_was_resized_is_not_used(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in (1, 2):
            mgr.save(s, lora_state(s))  # 2 references step 1's frozen base
        for shard in (Path(root) / step_dirname(1)).glob("*.shard"):
            with shard.open("ab") as f:
                f.write(b"\0")
        with pytest.warns(UserWarning, match="writing in full"):
            info = mgr.save(3, lora_state(3)).wait()
    assert info.depends_on == () and info.bytes_referenced == 0
    got = lora_state(0)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.load(got, step=3) == 3
    assert_bit_equal(got, lora_state(3))


def test_the_manifest_cache_needs_the_same_bytes(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        mgr.save(1, lora_state(1))
    loc = open_location(root)
    cached = inc._read_manifest(loc, 1)
    path = Path(root) / step_dirname(1) / "manifest.json"
    data = path.read_bytes()
    assert inc._read_manifest(loc, 1) is cached  # the bytes committed: not parsed again
    path.write_bytes(data.replace(b'"step":1', b'"step":2', 1))  # other bytes, a bad checksum
    with pytest.raises(shardckpt.CorruptCheckpointError):
        inc._read_manifest(loc, 1)
