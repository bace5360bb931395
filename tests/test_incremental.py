"""Incremental saves end to end (one process): what is written, what every step loads, verify,
info/ls/show, ``full_every``, old-format steps, damage and repair, prune to the last step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from incremental_helpers import (
    adapter_bytes,
    load_step,
    lora_state,
    read_doc,
    root_bytes,
    write_doc,
    zeros_like,
)

import shardckpt
from shardckpt.cli.main import main
from shardckpt.format import refs as R
from shardckpt.storage import step_dirname

CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(CHUNK))


def save_steps(root: str, steps: list[int], **kw: object) -> list[shardckpt.CheckpointInfo]:
    out = []
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True, **kw) as mgr:
        for s in steps:
            info = mgr.save(s, lora_state(s)).wait()
            assert isinstance(info, shardckpt.CheckpointInfo)
            out.append(info)
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_each_save_writes_what_changed_and_every_step_loads_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    infos = save_steps(root, [1, 2, 3, 4, 5])
    full = infos[0].nbytes
    changed = adapter_bytes(lora_state(2))
    assert infos[0].depends_on == () and infos[0].bytes_referenced == 0
    for info in infos[1:]:
        assert info.nbytes <= 1.2 * (changed + (1 << 20)), info
        assert info.nbytes < 0.2 * full
        assert info.depends_on == (1,)  # always the physical holder: never a chain
        assert info.bytes_referenced >= 4 * 64 * 1024 * 4  # the frozen base
    for s in [1, 2, 3, 4, 5]:
        load_step(root, s, lora_state(s))
        code, out, err = cli(capsys, "verify", root, "--step", str(s), "--json")
        assert code == 0, out + err
        integrity = json.loads(out)["checks"][0]
        assert integrity["ok"] and integrity["depends_on"] == ([] if s == 1 else [1])
    code, out, _ = cli(capsys, "ls", root, "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 0 and rows[5]["depends_on"] == [1] and rows[5]["bytes_referenced"] > 0
    assert rows[5]["bytes_written"] == infos[4].nbytes
    code, out, _ = cli(capsys, "show", root, "--step", "5")
    assert code == 0 and "references" in out and "[1]" in out


def test_reuse_is_decided_by_the_bytes_only(tmp_path: Path) -> None:
    """A frozen tensor (requires_grad False, same object) whose bytes change is written."""
    root = str(tmp_path / "run")
    state = lora_state(1)
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        mgr.save(1, state)
        w = state["model"]["layers.0.weight"]
        w[10:12] += 1.0  # in place: same object, same version-agnostic identity
        info = mgr.save(2, state).wait()
    assert info is not None and info.nbytes >= 2 * 1024 * 4  # the changed chunk was written
    load_step(root, 2, state)


def test_default_is_full_and_old_format_is_never_a_base(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:  # incremental=False
        a = mgr.save(1, lora_state(1)).wait()
        b = mgr.save(2, lora_state(2)).wait()
    assert a is not None and b is not None and b.depends_on == () and b.nbytes > 0.8 * a.nbytes
    doc = read_doc(root, 2)
    assert doc[R.CHUNK_DIGEST] == R.DIGEST_NAME  # a full save is still a possible base
    del doc[R.CHUNK_DIGEST]  # as an older version wrote it
    write_doc(root, 2, doc)
    [c] = save_steps(root, [3])
    assert c.depends_on == () and c.nbytes > 0.8 * a.nbytes
    [d] = save_steps(root, [4])
    assert d.depends_on == (3,)
    load_step(root, 4, lora_state(4))


def test_full_every_counts_from_the_manifests_across_restarts(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    infos = save_steps(root, [1, 2, 3], full_every=3)
    infos += save_steps(root, [4, 5, 6, 7], full_every=3)  # a restart: the count goes on
    full = [i.step for i in infos if not i.depends_on]
    assert full == [1, 4, 7]
    assert [i.depends_on for i in infos if i.depends_on] == [(1,), (1,), (4,), (4,)]
    load_step(root, 6, lora_state(6))
    with pytest.raises(ValueError, match="full_every"):
        shardckpt.CheckpointManager(root, incremental=True, full_every=-1)


def _flip_referenced_byte(root: str, step: int, target: int | None = None) -> str:
    """Flip one byte of a chunk that ``step`` references from an earlier step; that file's
    name (``step-N/file``)."""
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        full = mgr.manifest(step, pieces=True)
    chunk = next(c for e in full.tensors.values() if e.meta is not None
                 for p in e.meta.pieces for c in p.chunks
                 if c.ref is not None and (target is None or c.ref[0] == target))
    assert chunk.ref is not None
    path = Path(root) / step_dirname(chunk.ref[0]) / chunk.ref[1]
    data = bytearray(path.read_bytes())
    data[chunk.offset + 5] ^= 0x40
    path.write_bytes(bytes(data))
    return f"{step_dirname(chunk.ref[0])}/{chunk.ref[1]}"


def test_damaged_base_fails_verify_and_load_falls_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        mgr.save(1, lora_state(1))
        other = lora_state(2)
        other["model"] = {k: v + 1 for k, v in other["model"].items()}  # nothing in common
        mgr.save(2, other)
        mgr.save(3, other)  # references step 2 only
    assert 2 in R.depends_on(read_doc(root, 3), 3)  # (and 1, for the unchanged RNG states)
    name = _flip_referenced_byte(root, 3, target=2)
    code, out, err = cli(capsys, "verify", root, "--step", "3", "--json")
    integrity = json.loads(out)["checks"][0]
    assert code == 2 and not integrity["ok"] and name in integrity["detail"], out + err
    assert [b["file"] for b in integrity["bad_files"]] == [name]
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        got = zeros_like(lora_state(1))
        with pytest.warns(UserWarning, match="cannot be loaded"):
            assert mgr.load(got) == 1
    assert got["step"] == 1


def test_repair_from_a_replica_heals_a_referenced_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with shardckpt.CheckpointManager(a, replicas=[b], async_save=False, incremental=True) as m:
        for s in (1, 2, 3):
            m.save(s, lora_state(s))
    name = _flip_referenced_byte(a, 3)
    code, out, _ = cli(capsys, "verify", a, "--step", "3", "--json")
    assert code == 2 and name in out
    code, out, _ = cli(capsys, "verify", a, "--replica", b, "--step", "3", "--json")
    assert code == 0, out  # a good copy elsewhere: degraded, not failed
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--step", "3", "--json")
    assert code == 0, out + err
    code, out, _ = cli(capsys, "verify", a, "--step", "3", "--json")
    assert code == 0, out
    load_step(a, 3, lora_state(3))


def test_prune_to_the_last_step_keeps_what_it_references(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    infos = save_steps(root, [1, 2, 3, 4, 5])
    full = infos[0].nbytes
    with shardckpt.CheckpointManager(root, async_save=False,
                                     retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
        report = mgr.prune()
        assert mgr.steps() == [5]
    assert sorted(report.deleted) == [1, 2, 3, 4] and report.retired == (1,)
    assert (Path(root) / "step-0000000001.retired").exists()
    assert not (Path(root) / step_dirname(2)).exists()
    load_step(root, 5, lora_state(5))
    assert main(["verify", root]) == 0
    assert root_bytes(root) <= 1.1 * full + (64 << 10), (root_bytes(root), full)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        got = lora_state(0)
        assert mgr.load(got) == 5
        with pytest.raises(shardckpt.ShardckptError):
            mgr.load(lora_state(0), step=1)  # retired: hidden from load()
    # a later full save makes step 1 unreferenced once 5 goes: deleted whole, record too
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True,
                                     full_every=1) as mgr:  # no retention: no background prune
        mgr.save(6, lora_state(6))
    with shardckpt.CheckpointManager(root, retention=shardckpt.RetentionPolicy(keep_last=1)
                                     ) as mgr:
        report = mgr.prune()
        assert mgr.steps() == [6]
    assert "step-0000000001 (retired)" in report.reaped
    assert sorted(p.name for p in Path(root).iterdir()) == [".shardckpt", ".shardckpt-root",
                                                          "audit", step_dirname(6)]
    load_step(root, 6, lora_state(6))


def test_base_with_references_is_resolved_to_the_physical_holder(tmp_path: Path) -> None:
    """Step 3's base (2) references step 1: step 3 references step 1 directly."""
    root = str(tmp_path / "run")
    save_steps(root, [1, 2, 3])
    for s in (2, 3):
        assert {r.step for r in R.references(read_doc(root, s), s)} == {1}


def test_export_diff_and_consolidation_follow_references(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    root = str(tmp_path / "run")
    save_steps(root, [1, 2])
    want = lora_state(2)
    flat = shardckpt.consolidated_state_dict(root, 2)
    for k, v in want["model"].items():
        assert flat[f"model/{k}"].equal(v)
    out = tmp_path / "s2.safetensors"
    shardckpt.export(root, 2, "safetensors", out=str(out))
    exported = load_file(str(out))
    assert exported["model/layers.0.weight"].equal(want["model"]["layers.0.weight"])
    code, text, err = cli(capsys, "diff", f"{root}@1", f"{root}@2", "--json")
    doc = json.loads(text)
    assert code == 0, err
    status = {r["key"]: r["status"] for r in doc["tensors"]}
    assert status["model/layers.0.weight"] == "same"
    assert status["model/layers.0.lora_A"] == "changed"


def test_a_base_being_pruned_is_not_used_and_a_leased_base_is_not_pruned(
        tmp_path: Path) -> None:
    from shardckpt.prune import prune_location
    from shardckpt.storage import open_location
    from shardckpt.storage.lease import REAPER, WRITER, Lease

    root = str(tmp_path / "run")
    save_steps(root, [1])
    loc = open_location(root)
    reaper = Lease.acquire(loc, [step_dirname(1)], REAPER)  # a prune deleting step 1
    try:
        [b] = save_steps(root, [2])
    finally:
        reaper.release()
    assert b.depends_on == ()  # saved in full
    [c] = save_steps(root, [3])
    assert c.depends_on == (2,)
    writer = Lease.acquire(loc, step_dirname(2), WRITER)  # a save using step 2 as its base
    try:
        report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=1), grace=0)
    finally:
        writer.release()
    assert 2 in report.kept and 2 not in report.deleted
    load_step(root, 3, lora_state(3))
