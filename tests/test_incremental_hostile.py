"""Hostile references: each is refused with ``CorruptCheckpointError`` before any byte of the
file it names is read (only the target's *manifest* may be read, to check the reference)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from incremental_helpers import load_step, lora_state, read_doc, write_doc, zeros_like

import shardckpt
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format import refs as R
from shardckpt.format import shard as S
from shardckpt.storage import local as L
from shardckpt.storage import step_dirname


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1 (full), 3 (references 1) and 5 (full, with nothing in common)."""
    root = tmp_path_factory.mktemp("hostile") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("SHARDCKPT_FSYNC", "0")
    try:
        with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True) as mgr:
            mgr.save(1, lora_state(1))
            mgr.save(3, lora_state(3))
            other = lora_state(5)
            other["model"] = {k: v + 1 for k, v in other["model"].items()}
            mgr.save(5, other)
    finally:
        mp.undo()
    assert R.depends_on(read_doc(root, 3), 3) == [1]
    return root


@pytest.fixture
def root(saved: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(saved, dst)
    return dst


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every shard-file byte range read (relative paths)."""
    seen: list[str] = []
    real_range, real_into = L.LocalLocation.read_range, L.LocalLocation.read_into

    def read_range(self: Any, rel: str, offset: int, length: int) -> bytes:
        seen.append(rel)
        return real_range(self, rel, offset, length)

    def read_into(self: Any, rel: str, offset: int, out: memoryview) -> int:
        seen.append(rel)
        return real_into(self, rel, offset, out)

    monkeypatch.setattr(L.LocalLocation, "read_range", read_range)
    monkeypatch.setattr(L.LocalLocation, "read_into", read_into)
    return seen


def _refs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc[R.REFERENCES]


def _set(**kw: Any) -> Callable[[Path, dict[str, Any]], None]:
    def edit(root: Path, doc: dict[str, Any]) -> None:
        for r in _refs(doc):
            r.update(kw)
    return edit


def _uncommitted(root: Path, doc: dict[str, Any]) -> None:
    (root / step_dirname(0)).mkdir()  # a directory, no manifest
    for r in _refs(doc):
        r["step"] = 0


def _cycle(root: Path, doc: dict[str, Any]) -> None:
    """Step 1 made to reference step 3 back (its manifest then names a later step)."""
    one = read_doc(root, 1)
    one[R.REFERENCES] = copy.deepcopy(_refs(doc))
    for r in one[R.REFERENCES]:
        r["step"] = 3
    write_doc(root, 1, one)


def _retarget_file(root: Path, doc: dict[str, Any]) -> None:
    """A file that exists in step 1's directory but its manifest does not list."""
    src = root / step_dirname(1) / _refs(doc)[0]["file"]
    (root / step_dirname(1) / "rank00099-000.shard").write_bytes(src.read_bytes())
    _refs(doc)[0]["file"] = "rank00099-000.shard"


CASES: dict[str, tuple[Callable[[Path, dict[str, Any]], None], str]] = {
    "outside-root": (_set(file="../../step-0000000001/rank00000-000.shard"), "outside the root"),
    "missing-step": (_set(step=0), "missing"),
    "uncommitted-step": (_uncommitted, "not committed"),
    "file-not-listed": (_retarget_file, "does not list"),
    "cycle-self": (_set(step=3), "cycle"),
    "cycle-mutual": (_cycle, "later step"),
    "later-step": (_set(step=5), "later step"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_reference_is_refused_before_reading_the_target(root: Path, case: str,
                                                                reads: list[str]) -> None:
    edit, match = CASES[case]
    doc = read_doc(root, 3)
    edit(root, doc)
    write_doc(root, 3, doc)
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        with pytest.raises(CorruptCheckpointError, match=match):
            mgr.load(zeros_like(lora_state(3)), step=3)
    assert not [r for r in reads if r.endswith(".shard") and not r.startswith(step_dirname(3))]


def _rewrite_header(root: Path, step: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the header of every shard file of ``step``, resealed, manifest updated."""
    doc = read_doc(root, step)
    for name, rec in doc["files"].items():
        path = root / step_dirname(step) / name
        data = path.read_bytes()
        off = rec["header_offset"]
        head = json.loads(data[off:-S.TRAILER_SIZE])
        edit(head)
        raw = json.dumps(head, separators=(",", ":")).encode()
        digest = xxhash.xxh3_64_intdigest(raw)
        new = data[:off] + raw + S.TRAILER.pack(off, len(raw), digest, S.TRAILER_MAGIC)
        path.write_bytes(new)
        rec.update(nbytes=len(new), header_xxh3=f"{digest:016x}")
    write_doc(root, step, doc)


def _each_ref(head: dict[str, Any], fn: Callable[[list[Any]], None]) -> None:
    for p in head["pieces"]:
        for c in p["chunks"]:
            if len(c) == 7:
                fn(c)


@pytest.mark.parametrize("case, edit, match", [
    ("unlisted", lambda c: c[6].__setitem__(1, "rank00001-000.shard"), "do not list"),
    ("past-data", lambda c: c.__setitem__(0, 10**9), "outside its data region"),
    ("path", lambda c: c[6].__setitem__(1, "../x.shard"), "outside the root"),
])
def test_hostile_reference_chunk_is_refused(root: Path, reads: list[str], case: str,
                                            edit: Callable[[list[Any]], None],
                                            match: str) -> None:
    _rewrite_header(root, 3, lambda h: _each_ref(h, edit))
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        with pytest.raises(CorruptCheckpointError, match=match):
            mgr.load(zeros_like(lora_state(3)), step=3)
    assert not [r for r in reads if r.endswith(".shard") and not r.startswith(step_dirname(3))]


def test_untouched_copy_loads(root: Path) -> None:
    load_step(str(root), 3, lora_state(3))
