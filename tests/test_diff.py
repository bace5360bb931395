"""``shardckpt diff A B``: per-tensor statuses, JSON shape, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.diff_cmd import max_abs_diff
from shardckpt.cli.main import main
from shardckpt.extras import RNG_KEY


def _states() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    nan = torch.tensor([1.0, float("nan"), -0.0, 3.0])
    a = {"model": {"w": torch.randn(4, 5, generator=g),
                   "h": torch.randn(3, 3, generator=g).to(torch.bfloat16),
                   "ids": torch.arange(10, dtype=torch.int64),
                   "nanny": nan,
                   "gone": torch.ones(2)},
         "lr": 0.1, "epoch": 3}
    w = a["model"]["w"].clone()
    w[1, 2] += 0.001
    b = {"model": {"w": w, "h": a["model"]["h"].clone(), "ids": a["model"]["ids"].clone(),
                   "nanny": nan.clone(), "new": torch.zeros(3, dtype=torch.int32)},
         "lr": 0.05, "epoch": 3}
    return a, b


EXPECTED_W = float((_states()[1]["model"]["w"].double() - _states()[0]["model"]["w"].double())
                   .abs().max())


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("diff")
    one, two = str(base / "one"), str(base / "two")
    a, b = _states()
    with shardckpt.CheckpointManager(one, async_save=False) as mgr:
        mgr.save(10, a)
        mgr.save(20, b)
    with shardckpt.CheckpointManager(two, async_save=False) as mgr:
        mgr.save(7, b)
    return one, two


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["diff", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _user(doc: dict) -> dict[str, dict]:
    """Rows of the test's own tensors (the manager also saves RNG state as tensors)."""
    counts = {s: sum(1 for t in doc["tensors"] if t["status"] == s) for s in doc["summary"]}
    assert counts == doc["summary"]
    return {t["key"]: t for t in doc["tensors"] if not t["key"].startswith(RNG_KEY)}


def _check(doc: dict) -> None:
    by = _user(doc)
    statuses = sorted(t["status"] for t in by.values())
    assert statuses == ["added", "changed", "removed", "same", "same", "same"]
    assert by["model/w"]["status"] == "changed"
    assert by["model/w"]["max_abs_diff"] == EXPECTED_W  # exact, computed in float64
    assert by["model/new"]["status"] == "added" and by["model/gone"]["status"] == "removed"
    for k in ("model/h", "model/ids", "model/nanny"):
        assert by[k]["status"] == "same", by[k]
    assert doc["tree_changed"] == ["lr", "model"]  # epoch equal; model gained/lost keys


def test_same_root(roots: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    doc = _json(capsys, f"{one}@10", f"{one}@20")
    assert doc["a"] == f"{one}@10" and doc["b"] == f"{one}@20"
    assert set(doc) >= {"a", "b", "summary", "tensors", "tree_changed"}
    for t in doc["tensors"]:
        assert set(t) >= {"key", "status", "max_abs_diff"}
    _check(doc)


def test_across_roots_reads_bytes(roots: tuple[str, str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    one, two = roots
    _check(_json(capsys, f"{one}@10", f"{two}@7"))
    # identical checkpoints in two roots: all same, nothing in the tree
    doc = _json(capsys, f"{one}@20", f"{two}@7")
    assert {t["status"] for t in _user(doc).values()} == {"same"} and len(_user(doc)) == 5
    assert "model" not in doc["tree_changed"] and "lr" not in doc["tree_changed"]


def test_atol(roots: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    doc = _json(capsys, f"{one}@10", f"{one}@20", "--atol", "0.01")
    w = next(t for t in doc["tensors"] if t["key"] == "model/w")
    assert w["status"] == "same" and w["reason"] == "within_atol"


def test_human_output(roots: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    assert main(["diff", f"{one}@10", f"{one}@20"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\d+ same, 1 changed, 1 added, 1 removed$", out, re.M), out
    assert "model/w" in out and "model/new" in out and "model/gone" in out
    assert "model/ids" not in out


@pytest.mark.parametrize("spec", ["nostep", "root@x", "@5", "root@-1"])
def test_bad_spec_is_usage_error(roots: tuple[str, str], spec: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    assert main(["diff", f"{one}@10", spec]) == 64
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_last_at_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "user@host")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
    doc = _json(capsys, f"{root}@1", f"{root}@1")
    assert doc["summary"]["changed"] == 0 and _user(doc)["x"]["status"] == "same"


def test_missing_step_is_integrity_and_missing_root_is_usage(
        roots: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    assert main(["diff", f"{one}@10", f"{one}@99"]) == 2
    assert main(["diff", f"{one}@10", f"{tmp_path / 'nope'}@1"]) == 64  # like every command
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_root_alone_is_the_latest_step(roots: tuple[str, str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = roots
    latest = max(shardckpt.CheckpointManager(one).steps())
    doc = _json(capsys, f"{one}@10", one)
    assert doc["b"] == f"{one}@{latest}"
    assert _json(capsys, f"{one}@{latest}", f"{one}@latest")["summary"]["changed"] == 0


def test_max_abs_diff_units() -> None:
    big = torch.tensor([2**62, -(2**62)], dtype=torch.int64)
    assert max_abs_diff(big, -big) == 2**63  # exact, no int64 wraparound
    assert max_abs_diff(torch.tensor([True]), torch.tensor([False])) == 1
    f = torch.tensor([float("nan"), 1.0, float("inf")])
    assert max_abs_diff(f, torch.tensor([float("nan"), 1.5, float("inf")])) == 0.5
    assert max_abs_diff(f, torch.tensor([0.0, 1.0, float("inf")])) == float("inf")
    c = torch.tensor([1 + 1j], dtype=torch.complex64)
    assert max_abs_diff(c, torch.tensor([4 + 5j], dtype=torch.complex64)) == 5.0


def test_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "shardckpt", "diff", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "ROOT@STEP" in proc.stdout and "informational" in proc.stdout


def test_bits_dtype_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "r")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"z": torch.tensor([0.0, 1.0]), "d": torch.ones(2), "s": torch.ones(2)})
        mgr.save(2, {"z": torch.tensor([-0.0, 1.0]), "d": torch.ones(2, dtype=torch.float64),
                     "s": torch.ones(3)})
    by = _user(_json(capsys, f"{root}@1", f"{root}@2"))
    assert by["z"] == {"key": "z", "status": "changed", "max_abs_diff": 0.0, "reason": "bits"}
    assert by["d"]["reason"] == "dtype" and by["d"]["max_abs_diff"] is None
    assert by["s"]["reason"] == "shape" and by["s"]["status"] == "changed"
