"""Issue 25 item 3: an export never overwrites a file it did not write.

``export --format hf`` into a folder holding a user's ``config.json`` (or any file no shardckpt
export wrote) exits 64; a file export over an existing file exits 64 unless ``--force``; the
Python ``shardckpt.export`` takes ``overwrite=False`` the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.interop import ConversionError

USER_CONFIG = '{"model_type": "mine", "note": "hand-edited"}'


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "run")
    with shardckpt.CheckpointManager(path, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"model": {"w": torch.full((4, 4), float(step)),
                                      "b": torch.arange(3.0)}})
    return path


def export(root: str, *argv: str) -> int:
    return main(["export", root, "--only", "model", *argv])


def test_hf_refuses_a_folder_with_a_users_config(root: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(USER_CONFIG)
    assert export(root, "--format", "hf", "--out", str(out)) == 64
    assert "config.json, which no shardckpt export wrote" in capsys.readouterr().err
    assert os.listdir(out) == ["config.json"]


def test_hf_refuses_a_previous_export_that_a_user_added_a_config_to(
        root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert export(root, "--format", "hf", "--out", str(out)) == 0
    (out / "config.json").write_text(USER_CONFIG)  # the user's own, next to our weights
    theirs = tmp_path / "cfg.json"
    theirs.write_text('{"model_type": "llama"}')
    for extra in ([], ["--config", str(theirs)]):
        assert export(root, "--format", "hf", "--step", "1", "--out", str(out), *extra) == 64
        assert "config.json, which no shardckpt export wrote" in capsys.readouterr().err
        assert (out / "config.json").read_text() == USER_CONFIG
    with pytest.raises(ConversionError, match="no shardckpt export wrote"):
        shardckpt.export(root, step=1, format="hf", out=str(out), only="model",
                         config=str(theirs))
    # told to: the export goes in, the user's other files are never deleted
    assert export(root, "--format", "hf", "--step", "1", "--out", str(out), "--force",
                  "--config", str(theirs)) == 0
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}


def test_hf_replaces_its_own_export_and_config(root: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"model_type": "llama"}')
    assert export(root, "--format", "hf", "--out", str(out), "--config", str(cfg)) == 0
    cfg.write_text('{"model_type": "llama", "v": 2}')
    # the config.json it copied is its own: replaced; many shards and an index this time
    assert export(root, "--format", "hf", "--step", "1", "--out", str(out), "--config",
                  str(cfg), "--max-shard-size", "20") == 0
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert json.loads((out / "config.json").read_text())["v"] == 2
    # and back to one file without a config: the index and config of the last export are ours
    assert export(root, "--format", "hf", "--out", str(out)) == 0
    assert "model.safetensors" in os.listdir(out)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_file_export_needs_force_to_replace(root: str, tmp_path: Path, fmt: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.out"
    out.write_text("precious")
    assert export(root, "--format", fmt, "--out", str(out)) == 64
    assert "file exists" in capsys.readouterr().err
    assert out.read_text() == "precious"
    with pytest.raises(ConversionError, match="file exists"):
        shardckpt.export(root, format=fmt, out=str(out), only="model")
    assert out.read_text() == "precious"
    link = tmp_path / "link.out"
    link.symlink_to(tmp_path / "nowhere")  # a dangling link is in the way too
    with pytest.raises(ConversionError, match="symbolic link"):
        shardckpt.export(root, format=fmt, out=str(link), only="model")
    assert export(root, "--format", fmt, "--out", str(out), "--force") == 0
    assert out.stat().st_size > len("precious")
    shardckpt.export(root, step=1, format=fmt, out=str(out), only="model", overwrite=True)
    fresh = tmp_path / "new.out"
    shardckpt.export(root, format=fmt, out=str(fresh), only="model")  # a new file: no flag
    assert fresh.exists()


def test_dcp_force_writes_beside_foreign_files(root: str, tmp_path: Path) -> None:
    out = tmp_path / "dcp"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert export(root, "--format", "dcp", "--out", str(out)) == 64
    assert os.listdir(out) == ["notes.txt"]
    assert export(root, "--format", "dcp", "--out", str(out), "--force") == 0
    assert (out / "notes.txt").read_text() == "keep" and (out / ".metadata").exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_force_never_replaces_a_link_or_a_special_file(root: str, tmp_path: Path, kind: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--force replaces regular files only: a rename over a symlink, a FIFO or a device node
    (``--out /dev/null`` as root) would destroy it rather than write through it."""
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    out = tmp_path / "model.safetensors"
    if kind == "symlink":
        out.symlink_to(target)
    else:
        os.mkfifo(out)
    before = os.lstat(out)
    assert export(str(root), "--format", "safetensors", "--out", str(out), "--force") == 64
    assert "regular file" in capsys.readouterr().err
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert target.read_text() == "keep me"
    with pytest.raises(ConversionError, match="regular file"):
        shardckpt.export(root, format="safetensors", out=str(out), only="model", overwrite=True)
    # an hf folder holding a link under a name the export writes is refused the same way
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(target)
    assert export(str(root), "--format", "hf", "--out", str(folder), "--force") == 64
    assert (folder / "model.safetensors").is_symlink() and target.read_text() == "keep me"
