"""Issue 15 item 11: ``repair --dry-run`` prints exactly the plan that ``repair`` carries out,
and the summary describes the state after the repair.

Before, the dry run said a missing manifest "CANNOT" be repaired where a shard was missing too
(it did not count the copies it had just planned), the real run then repaired it, and the
summary counted steps that had been damaged as not healthy even after they were repaired.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.errors import StorageError
from shardckpt.storage import open_location

STEPS = range(1, 8)


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(128, 64, generator=g), "b": torch.randn(300, generator=g),
            "step": step}


def shards(root: Path, step: int) -> list[Path]:
    return sorted((root / f"step-{step:010d}").glob("*.shard"))


def damaged(base: Path) -> tuple[Path, Path, dict[int, list[str]]]:
    """Two locations of 7 steps, with one kind of damage per step (6 healthy), and each step's
    shard file names."""
    a, b = base / "a", base / "b"
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)]) as mgr:
        for step in STEPS:
            mgr.save(step, state_for(step))
    names = {step: [p.name for p in shards(a, step)] for step in STEPS}
    victim = shards(a, 1)[0]  # 1: a corrupt shard at a
    data = bytearray(victim.read_bytes())
    data[64] ^= 0x10
    victim.write_bytes(bytes(data))
    (b / "step-0000000002" / "manifest.json").unlink()  # 2: b lost its manifest and a shard
    shards(b, 2)[0].unlink()
    for p in sorted((b / "step-0000000003").iterdir()):  # 3: b lost the whole step directory
        p.unlink()
    (b / "step-0000000003").rmdir()
    (a / "step-0000000004" / "manifest.json").unlink()  # 4: a lost its manifest only
    shards(b, 5)[-1].unlink()  # 5: b lost a shard
    for root in (a, b):  # 7: a shard lost everywhere: nothing can bring it back
        shards(root, 7)[0].unlink()
    return a, b, names


def tree_digest(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_plan_is_what_the_real_run_does(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b, name = damaged(tmp_path)
    before = tree_digest(a, b)
    code, out, _ = cli(capsys, "repair", str(a), "--replica", str(b), "--dry-run", "--json")
    assert code == 2  # step 7 cannot be repaired
    dry = json.loads(out)
    assert tree_digest(a, b) == before  # a dry run changes nothing
    code, out, _ = cli(capsys, "repair", str(a), "--replica", str(b), "--json")
    assert code == 2
    real = json.loads(out)
    assert dry["dry_run"] is True and real["dry_run"] is False
    assert [s["step"] for s in dry["steps"]] == [s["step"] for s in real["steps"]] == list(STEPS)
    for d, r in zip(dry["steps"], real["steps"]):
        assert d["plan"] == r["plan"], d["step"]
        for key in ("repaired", "manifests_restored", "unrepairable", "ok", "healthy_before"):
            assert d[key] == r[key], (d["step"], key)
        assert r["failed"] == []
    plan = {s["step"]: [(x["action"], Path(x["location"]).name, x["file"]) for x in s["plan"]]
            for s in real["steps"]}
    assert plan[1] == [("copy", "a", name[1][0])]
    assert plan[2] == [("copy", "b", name[2][0]), ("restore_manifest", "b", "manifest.json")]
    assert plan[3] == [("copy", "b", n) for n in name[3]] + [
        ("restore_manifest", "b", "manifest.json")]
    assert plan[4] == [("restore_manifest", "a", "manifest.json")]
    assert plan[5] == [("copy", "b", name[5][-1])]
    assert plan[6] == [] and plan[7] == []
    assert [e["file"] for e in real["steps"][6]["unrepairable"]] == [name[7][0]] * 2
    assert dry["summary"] == ("7 checkpoints checked: 1 healthy everywhere, 5 would be "
                              "repaired, 1 cannot be; after this repair 6 of 7 would be healthy "
                              "everywhere (dry run: nothing was changed)")
    assert real["summary"] == ("7 checkpoints checked: 1 already healthy everywhere, 5 repaired, "
                               "1 still damaged; 6 of 7 now healthy everywhere")
    # the state after: nothing left to do but step 7, and each location alone loads 1-6
    code, out, _ = cli(capsys, "repair", str(a), "--replica", str(b), "--dry-run", "--json")
    after = json.loads(out)
    assert all(s["plan"] == [] for s in after["steps"])
    assert after["summary"].startswith("7 checkpoints checked: 6 healthy everywhere, 0 would")
    for root in (a, b):
        mgr = shardckpt.CheckpointManager(str(root))
        assert mgr.steps() == list(STEPS)
        for step in range(1, 7):
            got = {"w": torch.zeros(128, 64), "b": torch.zeros(300), "step": 0}
            mgr.load(got, step)
            want = state_for(step)
            assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"])


def test_dry_run_prints_the_lines_the_real_run_prints(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = damaged(tmp_path)
    code, dry_out, dry_err = cli(capsys, "repair", str(a), "--replica", str(b), "--dry-run")
    assert code == 2
    code, real_out, real_err = cli(capsys, "repair", str(a), "--replica", str(b))
    assert code == 2
    dry_lines, real_lines = dry_out.splitlines(), real_out.splitlines()
    assert dry_lines[:-1] == real_lines[:-1]  # the plan, line for line
    assert len(dry_lines) == 1 + 2 + 3 + 1 + 1 + 1  # steps 1-5: 8 actions, then the summary
    assert f"step 2: restore {b}/step-0000000002/manifest.json from {a} (" in dry_out
    cannot = dry_err.splitlines()  # only step 7 cannot be repaired, at both locations
    assert len(cannot) == 2 and all(line.startswith("step 7: CANNOT repair ") for line in cannot)
    assert f"CANNOT repair {a}/step-0000000007/" in dry_err
    assert dry_err == real_err
    assert real_lines[-1].endswith("6 of 7 now healthy everywhere")


def test_a_failed_copy_is_reported_and_keeps_the_manifest_away(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardckpt import repair as repair_mod

    a, b, _ = damaged(tmp_path)
    real_copy = repair_mod.copy_file

    def flaky(src: Any, dst: Any, rel: str, nbytes: int) -> None:
        if rel.startswith("step-0000000002/"):
            raise StorageError(f"{dst.display}/{rel}: injected: connection reset")
        real_copy(src, dst, rel, nbytes)

    monkeypatch.setattr(repair_mod, "copy_file", flaky)
    locs = [open_location(str(a)), open_location(str(b))]
    planned = repair_mod.repair_step(locs, 2, dry_run=True)
    done = repair_mod.repair_step(locs, 2)
    assert done.plan == planned.plan and len(done.plan) == 2
    assert [f["action"] for f in done.failed] == ["copy", "restore_manifest"]
    assert "injected: connection reset" in done.failed[0]["error"]
    assert not done.ok and done.repaired == [] and done.manifests_restored == []
    assert not (b / "step-0000000002" / "manifest.json").exists()  # never looks committed
    assert 2 not in shardckpt.CheckpointManager(str(b)).steps()
