"""Referenced files of an incremental step fall back per file, per location and per chunk, as the
step's own files do; a step is moved aside only where its own copy is bad (issue 30, trial s8)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import incr_s8_targets as S
import pytest
from harness import run_ranks
from incremental_helpers import assert_bit_equal, lora_state, zeros_like

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage import step_dirname

A, B = "rank00000-000.shard", "rank00000-001.shard"


def _save(root: Path, rep: Path, steps: int, **kw: object) -> None:
    with shardckpt.CheckpointManager(str(root), replicas=[str(rep)], async_save=False,
                                     incremental=True, full_every=3, **kw) as mgr:
        for s in range(1, steps + 1):
            mgr.save(s, lora_state(s))


def _file(loc: Path, step: int, name: str) -> Path:
    return loc / step_dirname(step) / name


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # the middle of the data region: a chunk of the frozen base
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _load(root: Path, rep: Path, step: int | None = None) -> tuple[int, dict, list[str]]:
    got = zeros_like(lora_state(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(str(root), replicas=[str(rep)],
                                         async_save=False) as mgr:
            loaded = mgr.load(got, step=step)
    return loaded, got, [str(w.message) for w in caught]


def _aside(*locs: Path) -> list[str]:
    return sorted(n for loc in locs for n in os.listdir(loc) if ".corrupt-" in n)


def _two_files(root: Path) -> None:
    names = sorted(os.listdir(root / step_dirname(7)))
    assert A in names and B in names, names


def test_missing_at_root_flipped_at_replica_loads_the_newest(tmp_path: Path) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    _two_files(root)
    _file(root, 7, A).unlink()
    _flip(_file(rep, 7, B))
    loaded, got, _ = _load(root, rep)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))
    assert _aside(root, rep) == []
    assert (root / step_dirname(8)).is_dir() and (rep / step_dirname(8)).is_dir()


def test_truncated_at_root_flipped_at_replica_loads_the_step(tmp_path: Path) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    _truncate(_file(root, 7, A))
    _flip(_file(rep, 7, B))
    loaded, got, _ = _load(root, rep, step=8)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))
    loaded, got, _ = _load(root, rep, step=7)
    assert_bit_equal(got, lora_state(7))


def test_a_retired_base_damaged_differently_at_each_location_resumes(tmp_path: Path) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8, retention=shardckpt.RetentionPolicy(keep_last=1))
    with shardckpt.CheckpointManager(str(root), replicas=[str(rep)]) as mgr:
        assert mgr.steps() == [8]
    base = 7
    held = sorted(os.listdir(root / step_dirname(base)))
    assert A in held and B in held, held  # retired: the referenced files are kept
    _file(root, base, A).unlink()
    _flip(_file(rep, base, B))
    loaded, got, _ = _load(root, rep)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))


def test_each_location_missing_another_referenced_file_loads_and_moves_nothing(
        tmp_path: Path) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    _file(root, 7, A).unlink()
    _file(rep, 7, B).unlink()
    loaded, got, _ = _load(root, rep)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))
    assert _aside(root, rep) == []


def test_a_referenced_file_with_no_good_copy_falls_back_and_saves_again(
        tmp_path: Path) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    _file(root, 7, A).unlink()
    _file(rep, 7, A).unlink()  # no copy anywhere: steps 7 and 8 cannot load from anywhere
    loaded, got, messages = _load(root, rep)
    assert loaded == 6
    assert_bit_equal(got, lora_state(6))
    assert any("cannot be loaded" in m and "step 8" in m for m in messages), messages
    aside = _aside(root, rep)  # only steps that no location can serve, so they can be saved
    assert sorted(n[:15] for n in aside) == [step_dirname(7)] * 2 + [step_dirname(8)] * 2
    with shardckpt.CheckpointManager(str(root), replicas=[str(rep)], async_save=False,
                                     incremental=True, full_every=3) as mgr:
        for s in (7, 8):
            mgr.save(s, lora_state(s))
    loaded, got, _ = _load(root, rep)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))


def _verify(capsys: pytest.CaptureFixture[str], root: Path, rep: Path) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["verify", str(root), "--replica", str(rep), "--step", "8", "--json"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)["checks"][0]


def test_verify_counts_only_the_files_with_no_good_copy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    own = len(json.loads((root / step_dirname(8) / "manifest.json").read_bytes())["files"])
    _file(root, 7, A).unlink()
    _file(rep, 7, B).unlink()  # each file has a good copy somewhere
    code, check = _verify(capsys, root, rep)
    assert code == 0 and check["bad_files"] == [], check["detail"]
    assert len(check["degraded"]) == 2, check["degraded"]
    assert "2 damaged copies elsewhere" in check["detail"], check["detail"]
    _file(rep, 7, A).unlink()  # now step 7's A has no copy: that file alone
    code, check = _verify(capsys, root, rep)
    assert code == 2
    assert [b["file"] for b in check["bad_files"]] == [f"{step_dirname(7)}/{A}"]
    assert check["detail"].startswith(f"1 of {own + 2} files"), check["detail"]
    assert f"without a good copy: 1 of step 7 ({step_dirname(7)}/{A})" in check["detail"]


def test_two_chunks_of_one_referenced_file_bad_at_different_locations_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(64 << 10))  # several chunks a piece
    root, rep = tmp_path / "root", tmp_path / "rep"
    _save(root, rep, 8)
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        full = mgr.manifest(8, pieces=True)
    piece = next(p for e in full.tensors.values() if e.meta is not None for p in e.meta.pieces
                 if sum(c.ref is not None for c in p.chunks) >= 2)  # one piece, two chunks
    refs = [c for c in piece.chunks if c.ref is not None]
    name = refs[0].ref[1]
    offsets = [c.offset for c in refs if c.ref[1] == name]
    assert len(offsets) >= 2, refs
    for loc, offset in ((root, offsets[0]), (rep, offsets[-1])):
        path = _file(loc, 7, name)
        data = bytearray(path.read_bytes())
        data[offset + 3] ^= 0x10
        path.write_bytes(bytes(data))
    loaded, got, _ = _load(root, rep)
    assert loaded == 8
    assert_bit_equal(got, lora_state(8))
    assert _aside(root, rep) == []


def test_two_ranks_load_when_each_location_lost_another_referenced_file(
        tmp_path: Path) -> None:
    env = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1",
           "SHARDCKPT_FSYNC": "0", "SHARDCKPT_CHUNK_SIZE": str(64 << 10)}
    root, rep = tmp_path / "root", tmp_path / "rep"
    run_ranks(S.save_with_replica, 2, str(root), str(rep), [1, 2], timeout=240, env=env)
    names = sorted(os.listdir(root / step_dirname(1)))
    r0, r1 = (next(n for n in names if n.startswith(f"rank{r:05d}")) for r in (0, 1))
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        full = mgr.manifest(2, pieces=True)
    offset = next(c.offset for e in full.tensors.values() if e.meta is not None
                  for p in e.meta.pieces for c in p.chunks if c.ref == (1, r1))
    _file(root, 1, r0).unlink()
    path = _file(rep, 1, r1)
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x10  # a chunk step 2 references
    path.write_bytes(bytes(data))
    results = run_ranks(S.load_newest, 2, str(root), str(rep), timeout=240, env=env)
    assert results == [[2, []], [2, []]]
    assert _aside(root, rep) == []
