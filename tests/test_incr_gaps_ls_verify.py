"""``ls``, ``show`` and ``verify`` of incremental steps whose referenced files are damaged
(issue 30, gaps of a user trial): a step that depends on a damaged or missing file of an
earlier step is not shown as ok, and names that step and file as ``verify`` does; ``verify``
counts the referenced files it checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from incremental_cli_helpers import _small_chunks, cli  # noqa: F401 (an autouse fixture)
from incremental_helpers import lora_state

import shardckpt
from shardckpt.storage import step_dirname


def saves(root: str, steps: range) -> None:
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in steps:
            mgr.save(s, lora_state(s))


def base_file(root: str, step: int) -> str:
    """``step-N/<file>``: the file of an earlier step that ``step`` references most bytes of."""
    doc = json.loads((Path(root) / step_dirname(step) / "manifest.json").read_bytes())
    ref = max(doc["references"], key=lambda r: r["bytes"])
    return f"{step_dirname(ref['step'])}/{ref['file']}"


def test_ls_marks_steps_that_depend_on_a_missing_base_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    saves(root, range(1, 4))  # 2 and 3 reference step 1's frozen base
    name = base_file(root, 3)
    (Path(root) / name).unlink()
    code, out, err = cli(capsys, "ls", root, "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 2, out + err
    assert rows[1]["health"] == "damaged"  # its own file: as before
    for step in (2, 3):
        row = rows[step]
        assert row["health"] == "damaged", row
        assert row["reference_problems"] == [{"step": 1, "file": name, "problem": "missing",
                                              "location": root}], row
        assert f"depends on damaged step 1: {name} missing" in row["problems"][0], row
        assert f"step {step}: " in err and name in err
    code, out, _ = cli(capsys, "ls", root)  # the table names it under each step too
    assert code == 2 and out.count(f"depends on damaged step 1: {name} missing") == 2, out
    code, out, _ = cli(capsys, "show", root, "--step", "3")
    assert code == 2 and f"DAMAGED: {root}: depends on damaged step 1: {name}" in out, out
    # consistent with verify, which names the same file
    code, out, _ = cli(capsys, "verify", root, "--step", "3", "--json")
    assert code == 2 and name in [b["file"] for b in json.loads(out)["checks"][0]["bad_files"]]


def test_ls_reports_a_damaged_file_of_a_retired_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    saves(root, range(1, 4))
    with shardckpt.CheckpointManager(root, async_save=False,
                                     retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
        assert mgr.prune().retired == (1,)
    name = base_file(root, 3)
    path = Path(root) / name
    path.write_bytes(path.read_bytes()[:-1])  # cut: the step holding it is hidden from ls
    code, out, err = cli(capsys, "ls", root, "--json")
    (row,) = json.loads(out)
    assert code == 2 and row["step"] == 3 and row["health"] == "damaged", out + err
    assert row["reference_problems"][0]["file"] == name
    assert "bytes, not" in row["reference_problems"][0]["problem"]


def test_verify_counts_the_referenced_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    saves(root, range(1, 3))
    doc = json.loads((Path(root) / step_dirname(2) / "manifest.json").read_bytes())
    own, refs = len(doc["files"]), len(doc["references"])
    code, out, _ = cli(capsys, "verify", root, "--step", "2", "--json")
    check = json.loads(out)["checks"][0]
    assert code == 0 and check["files"] == own and check["referenced_files"] == refs
    assert check["files_checked"] == own + refs
    assert check["detail"].startswith(f"{own + refs} files ({own} of its own, {refs} "
                                      f"referenced from step(s) [1])"), check["detail"]
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        full = mgr.manifest(2, pieces=True)
    chunk = next(c for e in full.tensors.values() if e.meta is not None
                 for p in e.meta.pieces for c in p.chunks if c.ref is not None)
    assert chunk.ref is not None
    name = f"{step_dirname(chunk.ref[0])}/{chunk.ref[1]}"
    path = Path(root) / name
    data = bytearray(path.read_bytes())
    data[chunk.offset + 3] ^= 0x10  # a byte step 2 references
    path.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", root, "--step", "2", "--json")
    check = json.loads(out)["checks"][0]
    assert code == 2 and check["detail"].startswith(
        f"1 of {own + refs} files ({own} of its own, {refs} referenced from step(s) [1]) have "
        f"no good copy: "), check["detail"]
    assert name in check["detail"]
