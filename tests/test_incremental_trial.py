"""What a user trial of incremental saves (issue 30) found: a missing referenced file is bad
data like a missing file of the step's own (the load falls back, nothing half-loaded), and a
save never takes a base whose bytes are missing or were just found corrupt."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from incremental_helpers import assert_bit_equal, lora_state, zeros_like

import shardckpt
from shardckpt.storage import step_dirname


def _saves(root: str, steps: range, **kw: object) -> None:
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True, **kw) as mgr:
        for s in steps:
            mgr.save(s, lora_state(s))


def _shards(root: str, step: int) -> list[Path]:
    return sorted((Path(root) / step_dirname(step)).glob("*.shard"))


def test_a_missing_referenced_file_falls_back_and_never_half_loads(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _saves(root, range(1, 5), full_every=2)  # 1 full, 2 -> 1, 3 full, 4 -> 3
    for shard in _shards(root, 3):
        shard.unlink()
    got = zeros_like(lora_state(0))
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        with pytest.raises(shardckpt.ShardckptError, match=r"step-0000000003/.*is missing"):
            mgr.load(got, step=4)
        assert_bit_equal(got, zeros_like(lora_state(0)))  # nothing loaded
        with pytest.warns(UserWarning, match="step 4 cannot be loaded"):
            assert mgr.load(got) == 2
    assert_bit_equal(got, lora_state(2))


def test_a_base_whose_bytes_are_missing_is_not_used(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _saves(root, range(1, 4))  # 2 and 3 reference step 1's frozen base
    for shard in _shards(root, 1):
        shard.unlink()
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        with pytest.warns(UserWarning, match="writing in full"):
            info = mgr.save(4, lora_state(4)).wait()
    assert info.depends_on == ()


def test_a_base_found_corrupt_by_a_load_is_not_used(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _saves(root, range(1, 4))
    shard = _shards(root, 1)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of the frozen base
    shard.write_bytes(bytes(data))
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(shardckpt.ShardckptError, match="checksum mismatch"):
                mgr.load(zeros_like(lora_state(0)))  # every step needs the damaged bytes
        with pytest.warns(UserWarning, match="found corrupt; writing in full"):
            info = mgr.save(4, lora_state(4)).wait()
    assert info.depends_on == ()
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        got = zeros_like(lora_state(0))
        assert mgr.load(got, step=4) == 4
    assert_bit_equal(got, lora_state(4))


def test_full_every_needs_incremental(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs incremental=True"):
        shardckpt.CheckpointManager(str(tmp_path / "run"), full_every=3)


def test_prune_refuses_a_policy_given_as_dry_run(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path / "run")) as mgr:
        with pytest.raises(TypeError, match="takes a bool"):
            mgr.prune(shardckpt.RetentionPolicy(keep_last=1))  # type: ignore[arg-type]


def test_a_bad_read_once_value_fails_before_anything_is_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "run")
    _saves(root, range(1, 2))
    monkeypatch.setenv("SHARDCKPT_READ_ONCE", "yes")
    got = zeros_like(lora_state(0))
    with shardckpt.CheckpointManager(root) as mgr:
        with pytest.raises(ValueError, match=r"SHARDCKPT_READ_ONCE='yes'.*nothing was loaded"):
            mgr.load(got)
    assert_bit_equal(got, zeros_like(lora_state(0)))
