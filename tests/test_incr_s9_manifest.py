"""A base step whose manifest has one bad byte, or is gone (issue 30, trial s9, finding F2): the
steps that reference it cannot load (by design: a reference is valid only if its target has a
valid manifest), so ``ls``/``show`` mark them damaged naming that step and why, ``verify`` says
the references cannot be trusted (not that the intact files have no good copy), ``load()`` with
no step falls back past them, and ``repair`` from a replica heals them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from incremental_cli_helpers import _small_chunks, cli  # noqa: F401 (an autouse fixture)
from incremental_helpers import assert_bit_equal, load_step, lora_state, zeros_like

import shardckpt
from shardckpt.storage import step_dirname

MANIFEST = f"{step_dirname(1)}/manifest.json"


def saves(root: str, steps: range, **kw: object) -> None:
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True, **kw) as mgr:
        for s in steps:
            mgr.save(s, lora_state(s))


def damage(root: str, how: str, step: int = 1) -> None:
    path = Path(root) / step_dirname(step) / "manifest.json"
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()


WHY = {"flip": "invalid (manifest checksum mismatch)",
       "delete": "missing (step 1 is not committed)"}


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_ls_show_verify_name_the_base_steps_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    root = str(tmp_path / "run")
    saves(root, range(1, 5))  # 2, 3 and 4 reference step 1's files
    damage(root, how)
    line = f"depends on damaged step 1: {MANIFEST} {WHY[how]}, so no reference to step 1 " \
           f"can be trusted"
    code, out, err = cli(capsys, "ls", root, "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 2, out + err
    for step in (2, 3, 4):
        row = rows[step]
        assert row["health"] == "damaged", row
        assert row["reference_problems"] == [{"step": 1, "file": MANIFEST,
                                              "problem": WHY[how], "location": root}], row
        assert row["problems"] == [f"{root}: {line}"], row
        assert f"step {step}: {root}: {line}" in err, err
    code, out, _ = cli(capsys, "ls", root)
    assert code == 2 and out.count(line) == 3, out
    code, out, err = cli(capsys, "show", root, "--step", "3")
    assert code == 2 and f"DAMAGED: {root}: {line}" in out, out + err
    code, out, _ = cli(capsys, "show", root, "--step", "4", "--json")
    assert code == 2 and json.loads(out)["damage"] == [f"{root}: {line}"], out
    code, out, _ = cli(capsys, "verify", root, "--step", "2", "--json")
    check = json.loads(out)["checks"][0]
    assert code == 2 and not check["ok"], out
    assert check["untrusted_references"] == [
        {"step": 1, "problem": f"{root}/{MANIFEST} {WHY[how]}"}], check
    assert "no good copy" not in check["detail"], check["detail"]
    assert check["detail"].startswith(
        f"step 2 references step 1, which has no valid manifest at any location "
        f"({root}/{MANIFEST} {WHY[how]}): no reference to it can be trusted"), check["detail"]
    assert "`shardckpt repair` from a replica holding a valid manifest of step 1 restores it" \
        in check["detail"], check["detail"]
    code, out, _ = cli(capsys, "verify", root, "--step", "2")  # the text says the same
    assert code == 2 and "which has no valid manifest at any location" in out, out
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:  # info() says it too
        info = mgr.info(3)
    assert info.depends_on == (1,)
    assert info.dependency_problems == (f"step 1: {root}/{MANIFEST} {WHY[how]}",), info


def test_load_without_a_step_falls_back_past_them(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    saves(root, range(1, 7), full_every=3)  # 1 full, 2 and 3 -> 1, 4 full, 5 and 6 -> 4
    assert json.loads((Path(root) / step_dirname(6) / "manifest.json").read_bytes())[
        "references"][0]["step"] == 4
    damage(root, "flip", step=4)
    got = zeros_like(lora_state(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(root, async_save=False) as mgr:
            assert mgr.load(got) == 3  # past 6 and 5 (and 4, corrupt) to the newest loadable
    assert_bit_equal(got, lora_state(3))
    text = " ".join(str(w.message) for w in caught)
    assert "step 6 cannot be loaded" in text and "step 4 has no valid manifest" in text, text
    # with nothing older that loads, load() raises rather than loading a step it cannot trust
    other = str(tmp_path / "other")
    saves(other, range(1, 3))
    damage(other, "flip")
    with shardckpt.CheckpointManager(other, async_save=False) as mgr, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(shardckpt.CorruptCheckpointError, match="no valid manifest"):
            mgr.load(zeros_like(lora_state(0)))


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_repair_from_a_replica_heals_the_base_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    root, rep = str(tmp_path / "run"), str(tmp_path / "rep")
    saves(root, range(1, 5), replicas=[rep])
    before = (Path(rep) / MANIFEST).read_bytes()
    damage(root, how)
    code, out, _ = cli(capsys, "ls", root, "--replica", rep, "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 2 and rows[4]["health"] == "degraded", out  # whole at the replica
    assert rows[4]["locations"] == [
        {"url": root, "health": f"depends on damaged step 1: {MANIFEST} {WHY[how]}, so no "
                                f"reference to step 1 can be trusted"},
        {"url": rep, "health": "ok"}], rows[4]
    with shardckpt.CheckpointManager(root, replicas=[rep], async_save=False) as mgr:
        assert mgr.info(4).dependency_problems == ()  # the replica's is valid: it loads
    code, out, err = cli(capsys, "repair", root, "--replica", rep)
    assert code == 0, out + err
    assert (Path(root) / MANIFEST).read_bytes() == before
    code, out, err = cli(capsys, "ls", root, "--json")
    assert code == 0 and {r["step"]: r["health"] for r in json.loads(out)} == {
        1: "ok", 2: "ok", 3: "ok", 4: "ok"}, out + err
    code, out, _ = cli(capsys, "verify", root, "--step", "4")
    assert code == 0, out
    shutil.rmtree(rep)  # ROOT alone: every step loads bit for bit
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.info(4).dependency_problems == ()
    for step in (2, 3, 4):
        load_step(root, step, lora_state(step))
