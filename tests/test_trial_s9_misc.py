"""Session 9 trial findings (issue 30): a step's file deleted under a load is an incomplete
checkpoint, not a storage failure (F4); ``tag`` refuses a retired step (F6); saving a retired
step's number says it is retired (F7); ``full_every`` of the wrong type is a TypeError (F9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from incremental_helpers import lora_state, zeros_like

import shardckpt
from shardckpt.cli.main import main as cli_main
from shardckpt.engine import reader as reader_mod
from shardckpt.storage import step_dirname


def test_a_file_deleted_under_a_load_is_an_incomplete_checkpoint(tmp_path: Path,
                                                                 monkeypatch) -> None:
    state = {"a": torch.randn(5000), "b": torch.randn(7000)}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        real = reader_mod.CheckpointReader._read_span_at

        def vanish(self, index, piece, start, out):  # type: ignore[no-untyped-def]
            if self.step_dir == step_dirname(2):  # headers read; a prune removes the files
                for f in (tmp_path / step_dirname(2)).glob("*.shard"):
                    f.unlink()
            return real(self, index, piece, start, out)
        monkeypatch.setattr(reader_mod.CheckpointReader, "_read_span_at", vanish)
        with pytest.raises(shardckpt.IncompleteCheckpointError):
            mgr.load({k: torch.zeros_like(v) for k, v in state.items()}, step=2)
        monkeypatch.setattr(reader_mod.CheckpointReader, "_read_span_at", real)
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        assert mgr.load(out) == 1  # no step given: falls back past the incomplete one
        assert all(torch.equal(out[k], state[k]) for k in state)


def retired_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False,
                                     retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, lora_state(step))
    assert (root / f"{step_dirname(1)}.retired").exists()  # kept for the files 2, 3 use
    return root


def test_tag_refuses_a_retired_step(tmp_path: Path, capsys) -> None:
    root = retired_root(tmp_path)
    assert cli_main(["tag", str(root), "--step", "1", "--add", "pinned"]) == 2
    assert "retired" in capsys.readouterr().err


def test_saving_a_retired_steps_number_says_it_is_retired(tmp_path: Path) -> None:
    root = retired_root(tmp_path)
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        with pytest.raises(ValueError, match="retired"):
            mgr.save(1, lora_state(1))
        got = zeros_like(lora_state(3))
        assert mgr.load(got) == 3


@pytest.mark.parametrize("bad", ["3", None, 1.5, True])
def test_full_every_of_the_wrong_type_is_a_type_error(tmp_path: Path, bad: object) -> None:
    with pytest.raises(TypeError, match="full_every"):
        shardckpt.CheckpointManager(str(tmp_path), incremental=True, full_every=bad)


def test_a_killed_retirements_temp_file_is_reaped_after_the_grace(tmp_path: Path) -> None:
    """F8: a SIGKILL between writing a retired record and renaming it leaves
    ``step-N.retired.tmp-<hex>`` in the root; a prune removes it once the grace has passed."""
    import os
    import time

    root = retired_root(tmp_path)
    old = root / "step-0000000001.retired.tmp-0f19907c10fd"
    new = root / "step-0000000002.retired.tmp-997d383335bc"
    for f in (old, new):
        f.write_bytes(b"{}")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    from shardckpt.prune import prune_location
    from shardckpt.storage.local import LocalLocation

    policy = shardckpt.RetentionPolicy(keep_last=5)
    plan = prune_location(LocalLocation(str(root)), policy, dry_run=True)
    assert old.name in plan.reaped and new.name not in plan.reaped and old.exists()
    done = prune_location(LocalLocation(str(root)), policy)
    assert old.name in done.reaped and not old.exists() and new.exists()


@pytest.mark.parametrize("damage", ["lost", "flipped"])
def test_a_new_save_never_clears_a_step_dir_later_steps_reference(tmp_path: Path,
                                                                  damage: str) -> None:
    """A save of step N over step N's directory without a valid manifest clears it (a dead
    writer's leftovers) or moves it aside (corrupt): not when committed later steps reference
    its files (their bytes would go, or no longer be where they point)."""
    root = tmp_path / "root"
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, lora_state(step))
    manifest = root / step_dirname(1) / "manifest.json"
    files = {p.name: p.read_bytes() for p in (root / step_dirname(1)).glob("*.shard")}
    if damage == "lost":
        manifest.unlink()
    else:
        data = bytearray(manifest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        manifest.write_bytes(bytes(data))
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        with pytest.raises(ValueError, match="steps 2, 3 reference its files"):
            mgr.save(1, lora_state(1))
    assert {p.name: p.read_bytes() for p in (root / step_dirname(1)).glob("*.shard")} == files
    assert not list(root.glob("step-0000000001.corrupt-*"))


def test_repair_never_imposes_a_replicas_retirements_on_root(tmp_path: Path) -> None:
    """Trial #2: a replica pruned on its own (step 1 retired there, steps 2-3 deleted) while
    ROOT still holds every step: ``repair ROOT --replica REP`` leaves ROOT's step 1 a visible,
    loadable checkpoint (no retired record written at ROOT)."""
    from shardckpt.prune import prune_location
    from shardckpt.storage.local import LocalLocation

    root, rep = tmp_path / "b", tmp_path / "a"
    with shardckpt.CheckpointManager(str(root), replicas=[str(rep)], async_save=False,
                                     incremental=True, capture_rng=False) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, lora_state(step))
    prune_location(LocalLocation(str(rep)), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert (rep / f"{step_dirname(1)}.retired").exists()
    assert cli_main(["repair", str(root), "--replica", str(rep)]) in (0, 2)
    assert not (root / f"{step_dirname(1)}.retired").exists()
    with shardckpt.CheckpointManager(str(root), capture_rng=False) as mgr:
        assert mgr.steps() == [1, 2, 3, 4]
        for step in (1, 4):
            got = zeros_like(lora_state(step))
            assert mgr.load(got, step=step) == step
