"""Session 9 trial (#4): the signature of an incremental step covers the files it references
in earlier steps (``../step-M/FILE`` resources, as docs/operations.md says): a flipped byte in
one fails ``verify --public-key`` and a ``trusted_keys`` load; a retirement of the referenced
step by retention does not punch holes into a file a signed kept step covers."""

from __future__ import annotations

from pathlib import Path

import pytest
from incremental_helpers import lora_state, zeros_like
from test_sign import make_keys

import shardckpt
from shardckpt.cli.main import main
from shardckpt.prune import prune_location
from shardckpt.sign import SIGNATURE_NAME
from shardckpt.storage import step_dirname
from shardckpt.storage.local import LocalLocation


def signed_root(tmp_path: Path) -> tuple[Path, str, str]:
    key, pub = make_keys(tmp_path)
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, lora_state(step))
    assert main(["sign", str(root), "--step", "3", "--key", key]) == 0
    return root, key, pub


def test_the_signature_covers_referenced_files(tmp_path: Path) -> None:
    root, _, pub = signed_root(tmp_path)
    from shardckpt.catalog import read_manifest
    from shardckpt.sign.step import covered_files

    covered = covered_files(read_manifest(LocalLocation(str(root)), 3))
    assert any(n.startswith(f"../{step_dirname(1)}/") for n in covered), covered
    assert (root / step_dirname(3) / SIGNATURE_NAME).exists()
    assert main(["verify", str(root), "--step", "3", "--public-key", pub]) == 0
    target = sorted((root / step_dirname(1)).glob("*.shard"))[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01  # in the preamble's padding: XXH3 of chunks unchanged, SHA-256 not
    target.write_bytes(bytes(data))
    assert main(["verify", str(root), "--step", "3", "--public-key", pub]) == 2
    with shardckpt.CheckpointManager(str(root), trusted_keys=[pub], capture_rng=False) as mgr:
        with pytest.raises(shardckpt.ShardckptError):
            mgr.load(zeros_like(lora_state(3)), step=3)


def test_retiring_a_step_a_signed_step_references_keeps_its_files_whole(tmp_path: Path) -> None:
    root, _, pub = signed_root(tmp_path)
    before = {p.name: p.read_bytes() for p in (root / step_dirname(1)).glob("*.shard")}
    report = prune_location(LocalLocation(str(root)), shardckpt.RetentionPolicy(keep_last=1),
                            grace=0)
    assert 1 in report.retired
    after = {p.name: p.read_bytes() for p in (root / step_dirname(1)).glob("*.shard")}
    assert {n: after[n] for n in after} == {n: before[n] for n in after}  # not punched
    assert main(["verify", str(root), "--step", "3", "--public-key", pub]) == 0
