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
