"""Session 9: the commit reads its own manifest back (parsed beside the commit's directory
sync and file checks) and never writes one that does not parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash

import shardckpt
from shardckpt.format import manifest as M


def test_a_manifest_that_does_not_read_back_is_never_committed(tmp_path: Path,
                                                               monkeypatch) -> None:
    real = M.serialize

    def broken(manifest: M.Manifest) -> bytes:  # a checksummed manifest with a bad field
        data = real(manifest).replace(b'"byteorder":"little"', b'"byteorder":"middle"')
        prefix = data[:data.rindex(b',"checksum"')]
        return prefix + b',"checksum":"' + xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'
    state = {"w": torch.randn(1000)}
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False,
                                     capture_rng=False) as mgr:
        mgr.save(1, state)
        monkeypatch.setattr(M, "serialize", broken)
        with pytest.raises(shardckpt.ShardckptError, match=r"little-endian|byteorder"):
            mgr.save(2, state)
        monkeypatch.setattr(M, "serialize", real)
        assert mgr.steps() == [1]
        assert not (tmp_path / "step-0000000002" / "manifest.json").exists()
        mgr.save(3, state)  # and the next save commits
        assert mgr.steps() == [1, 3]
