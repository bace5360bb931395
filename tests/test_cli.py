"""The command line as a user runs it: JSON shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardckpt


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("cli") / "run")
    with shardckpt.CheckpointManager(d, async_save=False) as mgr:
        for step in (10, 20):
            mgr.save(step, {"w": torch.arange(12.0).reshape(3, 4) * step, "step": step},
                     metrics={"loss": 1.0 / step, "bad": float("nan")},
                     tags=("pinned",) if step == 10 else ())
    return d


def test_ls_json_matches_contract(root: str) -> None:
    proc = run_cli("ls", root, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        assert isinstance(r["time"], str) and "T" in r["time"]
        assert isinstance(r["nbytes"], int) and r["nbytes"] > 12 * 4
        assert r["world_size"] == 1
        assert r["metrics"]["loss"] == pytest.approx(1.0 / r["step"])
        assert r["metrics"]["bad"] == "nan"  # JSON has no NaN: stored as a string
    assert rows[0]["tags"] == ["pinned"] and rows[1]["tags"] == []
    assert rows[0]["locations"][0]["health"] == "ok"


def test_show_json_is_the_manifest(root: str) -> None:
    proc = run_cli("show", root, "--step", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["step"] == 10 and doc["format"] == "shardckpt-manifest"
    assert doc["tensors"]["w"]["shape"] == [3, 4] and doc["tensors"]["w"]["dtype"] == "float32"
    latest = json.loads(run_cli("show", root, "--json").stdout)
    assert latest["step"] == 20


def test_human_output(root: str) -> None:
    proc = run_cli("ls", root)
    assert proc.returncode == 0
    assert "pinned" in proc.stdout and "loss=0.05" in proc.stdout
    proc = run_cli("show", root, "--step", "20")
    assert "float32" in proc.stdout and "[3, 4]" in proc.stdout


@pytest.mark.parametrize("args, code", [
    (("show", "/definitely/not/here"), 2),  # no checkpoints yet (issue 25 item 6)
    (("frobnicate",), 64),
    (("ls",), 64),
    (("show", "{root}", "--step", "notanint"), 64),
    (("show", "{root}", "--step", "7"), 2),
])
def test_errors_are_one_line_with_contract_codes(root: str, args: tuple[str, ...],
                                                 code: int) -> None:
    proc = run_cli(*(a.format(root=root) for a in args))
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_corrupt_manifest_is_exit_2(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with shardckpt.CheckpointManager(str(d), async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    m = d / "step-0000000001" / "manifest.json"
    data = bytearray(m.read_bytes())
    data[20] ^= 0x01
    m.write_bytes(bytes(data))
    proc = run_cli("ls", str(d), "--json")
    assert proc.returncode == 2
    rows = json.loads(proc.stdout)
    assert [(r["step"], r["health"]) for r in rows] == [(1, "corrupt")]
    assert "manifest.json" in rows[0]["error"]
    assert "checksum" in proc.stderr and "Traceback" not in proc.stderr


def test_help_for_every_command() -> None:
    for cmd in ("ls", "show", "export"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout and "--replica" in proc.stdout


def test_show_hides_internal_tensors_and_prints_provenance_as_json(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with shardckpt.CheckpointManager(str(d), async_save=False) as mgr:  # RNG states captured
        mgr.save(1, {"w": torch.ones(3)})
    out = run_cli("show", str(d)).stdout
    assert "__shardckpt" not in out and "internal tensors" in out and "--all" in out
    assert "\nprovenance:\n  {\n" in out  # indented JSON, not one long Python repr
    assert max(len(line) for line in out.splitlines()) < 400
    full = run_cli("show", str(d), "--all").stdout
    assert "__shardckpt_rng__" in full and "internal tensors" not in full
