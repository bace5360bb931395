"""``shardckpt tag`` (issue 32): tags changed after the fact live beside the manifest (never
rewritten), ``pinned`` protects from pruning as at save time, each change is audited."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage import step_dirname


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    capsys.readouterr()
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def test_pinned_after_the_fact_protects_from_prune(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, {"w": torch.full((8,), float(step))}, tags=("nightly",))
    manifest = tmp_path / "run" / step_dirname(1) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()

    doc = _json(capsys, ["tag", root, "--step", "1", "--add", "pinned", "--remove", "nightly",
                         "--note", "release candidate", "--json"])
    assert doc["tags"] == ["pinned"]
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == digest  # never rewritten
    rows = _json(capsys, ["ls", root, "--json"])
    assert [r["tags"] for r in rows] == [["pinned"], ["nightly"], ["nightly"], ["nightly"]]
    report = _json(capsys, ["prune", root, "--keep-last", "1", "--json"])
    assert report["deleted"] == [2, 3]
    kept = {k["step"]: k["reasons"] for k in report["kept"]}
    assert set(kept) == {1, 4} and any("pinned" in r for r in kept[1])
    assert shardckpt.CheckpointManager(root).steps() == [1, 4]

    _json(capsys, ["tag", root, "--step", "1", "--remove", "pinned", "--json"])
    report = _json(capsys, ["prune", root, "--keep-last", "1", "--json"])
    assert report["deleted"] == [1]

    tags = [r for r in _json(capsys, ["log", root, "--json"])
            if r["event"] == "tag"]
    assert [t["detail"]["after"] for t in tags] == [["pinned"], []]
    assert tags[0]["detail"]["note"] == "release candidate"
    assert tags[0]["detail"]["before"] == ["nightly"]


def test_a_pinned_tag_of_the_save_can_be_removed(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, tags=("pinned",))
        mgr.save(2, {"w": torch.ones(2)})
    assert _json(capsys, ["prune", root, "--keep-last", "1", "--json"])["deleted"] == []
    _json(capsys, ["tag", root, "--step", "1", "--remove", "pinned", "--json"])
    assert _json(capsys, ["prune", root, "--keep-last", "1", "--json"])["deleted"] == [1]


def test_tag_needs_something_to_do(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    assert main(["tag", root, "--step", "1"]) == 64
    assert main(["tag", root, "--step", "9", "--add", "x"]) == 2  # no such step
