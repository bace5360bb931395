"""Issue 25 item 8: ``verify`` records only real verdicts.

A replay that cannot start because the model does not fit the checkpoint (other shapes, a key
the checkpoint lacks) exits 64 and writes no ``verification.json``; a replay that ran and
differed records ``failed``; one that passed records ``ok``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import shardckpt
from shardckpt.cli.main import main

STEP = 3


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    golden = shardckpt.Golden(inputs=[torch.randn(2, 4)], module="model")
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        mgr.save(STEP, {"model": model}, golden=golden)
    return tmp_path / "ck"


def record(root: Path) -> Path:
    return root / f"step-{STEP:010d}" / "verification.json"


def verify(capsys: pytest.CaptureFixture[str], root: Path, factory: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["verify", str(root), "--model", f"verify_fit_targets:{factory}", "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("factory", ["build_wider", "build_extra"])
def test_a_model_that_does_not_fit_exits_64_and_records_nothing(
        root: Path, capsys: pytest.CaptureFixture[str], factory: str) -> None:
    code, doc = verify(capsys, root, factory)
    assert code == 64 and doc["exit_code"] == 64, doc
    reassembly = next(c for c in doc["checks"] if c["name"] == "reassembly")
    assert not reassembly["ok"] and "does not match" in reassembly["detail"]
    assert not record(root).exists()
    capsys.readouterr()
    assert main(["ls", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["verified"] is None


def test_a_replay_that_differs_records_failed(root: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = verify(capsys, root, "build_shifted")
    assert code == 1, doc
    assert json.loads(record(root).read_text())["ok"] is False
    capsys.readouterr()
    main(["ls", str(root), "--json"])
    assert json.loads(capsys.readouterr().out)[0]["verified"] == "failed"


def test_a_replay_that_passes_records_ok(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = verify(capsys, root, "build_fit")
    assert code == 0, doc
    assert json.loads(record(root).read_text())["ok"] is True
