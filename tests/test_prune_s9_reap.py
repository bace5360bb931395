"""Issue 30, finding F1: a prune never reaps a step directory that kept steps reference, whatever
the state of its own manifest (removed, or damaged by one flipped byte): not from the CLI (dry
run or real), not from a manager's background retention; the report says why it was kept, and
the steps that reference it load bit for bit once ``repair`` restores the manifest. A corrupt
manifest that may hold references keeps every earlier step whole."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from incremental_helpers import load_step, lora_state

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage import step_dirname

BASE = step_dirname(1)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(64 << 10))


def _save(root: str, steps: list[int], **kw: object) -> None:
    with shardckpt.CheckpointManager(root, async_save=False, **kw) as mgr:
        for s in steps:
            mgr.save(s, lora_state(s))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.name.endswith(".shard")}


def _damage(manifest: Path, how: str) -> None:
    if how == "removed":
        manifest.unlink()
    else:
        data = bytearray(manifest.read_bytes())
        data[len(data) // 2] ^= 1
        manifest.write_bytes(bytes(data))


def _age(folder: Path, seconds: float) -> None:
    """Make the directory look untouched for ``seconds`` (past any grace period)."""
    then = time.time() - seconds
    for p in [*folder.iterdir(), folder]:
        os.utime(p, (then, then))


@pytest.mark.parametrize("how", ["removed", "flipped"])
def test_cli_prune_keeps_a_referenced_base_and_repair_restores_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _save(str(a), [1, 2, 3, 4], replicas=[str(b)], incremental=True)
    base = _digests(a / BASE)
    assert base
    _damage(a / BASE / "manifest.json", how)
    state = "missing" if how == "removed" else "damaged"
    for dry in (["--dry-run"], []):
        code, out, err = _cli(capsys, "prune", str(a), "--keep-last", "10", "--grace", "0s",
                              "--json", *dry)
        doc = json.loads(out)
        assert code == 2 and doc["reaped"] == [] and doc["deleted"] == [], out
        (held,) = doc["kept_dirs"]
        assert held["dir"] == BASE and "referenced by steps 2-4" in held["reason"]
        assert f"its manifest is {state}" in held["reason"] and "repair" in held["reason"]
        assert "kept: referenced by steps 2-4" in err and "(left alone)" in err
        assert _digests(a / BASE) == base
    code, out, _ = _cli(capsys, "prune", str(a), "--keep-last", "10", "--grace", "0s",
                        "--dry-run")
    assert code == 2 and "reap" not in out.replace("would reap 0", "")
    assert f"{BASE}  keep     referenced by steps 2-4; its manifest is {state}" in out
    code, out, err = _cli(capsys, "repair", str(a), "--replica", str(b), "--json")
    assert code == 0, out + err
    for s in (2, 3, 4):
        load_step(str(a), s, lora_state(s))
    code, out, _ = _cli(capsys, "prune", str(a), "--keep-last", "10", "--grace", "0s", "--json")
    assert code == 0 and "kept_dirs" not in json.loads(out)


def test_background_retention_keeps_a_referenced_base_without_a_replica(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _save(str(root), [1, 2, 3], incremental=True)
    manifest = root / BASE / "manifest.json"
    saved = manifest.read_bytes()
    base = _digests(root / BASE)
    manifest.unlink()
    _age(root / BASE, 2 * 3600)  # past the default grace of 1 h: reaped, were it unreferenced
    # step 4 is saved in full (the base's chain lacks step 1's manifest: test_incr_s9_replica)
    with pytest.warns(UserWarning, match=f"{BASE} kept: referenced by step 3"):
        with shardckpt.CheckpointManager(
                str(root), async_save=False, incremental=True,
                retention=shardckpt.RetentionPolicy(keep_last=2)) as mgr:
            mgr.save(4, lora_state(4))
    assert _digests(root / BASE) == base  # every file of it, referenced or not
    assert not (root / step_dirname(2)).exists()
    manifest.write_bytes(saved)  # the manifest back (from a backup): the kept steps load
    for s in (3, 4):
        load_step(str(root), s, lora_state(s))


def test_a_corrupt_manifest_with_references_keeps_every_earlier_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    _save(str(root), [1, 2], incremental=True)  # step 2 references step 1
    _save(str(root), [3])  # a full save: references nothing
    manifest = root / step_dirname(2) / "manifest.json"
    saved = manifest.read_bytes()
    _damage(manifest, "flipped")
    base = _digests(root / BASE)
    for dry in (["--dry-run"], []):
        code, out, err = _cli(capsys, "prune", str(root), "--keep-last", "1", "--json", *dry)
        doc = json.loads(out)
        assert code == 2 and doc["deleted"] == [], out
        (one,) = [k for k in doc["kept"] if k["step"] == 1]
        assert "the manifest of step 2 cannot be read" in one["reasons"][0]
        assert [c["step"] for c in doc["corrupt"]] == [2] and "step 2" in err
        assert _digests(root / BASE) == base
    manifest.write_bytes(saved)
    load_step(str(root), 2, lora_state(2))
    code, out, _ = _cli(capsys, "prune", str(root), "--keep-last", "1", "--json")
    assert code == 0 and json.loads(out)["deleted"] == [1, 2]


def test_a_referenced_step_moved_aside_as_corrupt_is_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    _save(str(root), [1, 2, 3], incremental=True)
    aside = root / f"{BASE}.corrupt-20200101T000000Z"  # moved aside long ago, by hand or a save
    (root / BASE).rename(aside)
    base = _digests(aside)
    code, out, _ = _cli(capsys, "prune", str(root), "--keep-last", "10", "--grace", "0s",
                        "--json")
    doc = json.loads(out)
    assert code == 2 and doc["reaped"] == [], out
    assert doc["kept_dirs"] == [{"dir": aside.name, "reason": "moved aside as corrupt, step 1 "
                                 "referenced by steps 2-3"}]
    assert _digests(aside) == base
    aside.rename(root / BASE)
    load_step(str(root), 3, lora_state(3))


def test_a_retired_step_that_a_corrupt_manifest_may_reference_stays_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    _save(str(root), [1, 2, 3], incremental=True)
    assert _cli(capsys, "prune", str(root), "--keep-last", "1")[0] == 0
    assert (root / f"{BASE}.retired").exists()  # step 3 references it
    _save(str(root), [4])  # a full save
    manifest = root / step_dirname(3) / "manifest.json"
    saved = manifest.read_bytes()
    _damage(manifest, "flipped")
    base = _digests(root / BASE)
    for dry in (["--dry-run"], []):
        code, out, _ = _cli(capsys, "prune", str(root), "--keep-last", "1", "--json", *dry)
        doc = json.loads(out)
        assert code == 2 and doc["reaped"] == [] and doc["deleted"] == [], out
        assert _digests(root / BASE) == base
    manifest.write_bytes(saved)
    load_step(str(root), 3, lora_state(3))
