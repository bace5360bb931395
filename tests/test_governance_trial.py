"""What a user trial of issue 32 found: a signed step swapped or overwritten in place is refused
by a trusted load (never a quiet rollback); tag typos are refused; a tags.json that cannot be
read keeps its step and is reported; the audit trail names the signer; ``log`` on a folder that
is not a root exits 2; a restore audited at a root with no save yet is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_sign import make_keys, save, state

import shardckpt
from shardckpt.audit import read_trail
from shardckpt.audit.trail import append
from shardckpt.cli.main import main
from shardckpt.sign import SignatureError
from shardckpt.storage import open_location, step_dirname


def test_swapped_signed_steps_are_refused_not_skipped(tmp_path: Path) -> None:
    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    for step in (1, 2, 3):
        save(root, step, float(step))
        assert main(["sign", root, "--step", str(step), "--key", key]) == 0
    two, three = (tmp_path / "run" / step_dirname(s) for s in (2, 3))
    two.rename(tmp_path / "swap")
    three.rename(two)
    (tmp_path / "swap").rename(three)
    got = state(0.0)
    with shardckpt.CheckpointManager(root, trusted_keys=[pub]) as mgr:
        with pytest.raises(SignatureError, match=r"step-0000000003 is signed but its manifest"):
            mgr.load(got)
        assert torch.equal(got["w"], state(0.0)["w"])  # untouched
        assert mgr.load(got, step=1) == 1  # an explicit older step still loads


@pytest.mark.parametrize(("name", "why"), [("pinned ", "spaces around it"),
                                           ("Pinned", "in lower case")])
def test_tag_typos_are_refused(tmp_path: Path, name: str, why: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    save(root, 1, 1.0)
    assert main(["tag", root, "--step", "1", "--add", name]) == 64
    assert why in capsys.readouterr().err
    assert main(["tag", root, "--step", "1", "--remove", "absent"]) == 0
    assert "had no tag 'absent'" in capsys.readouterr().err


def test_an_unreadable_tags_file_keeps_its_step_and_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    for step in (1, 2, 3):
        save(root, step, float(step))
    assert main(["tag", root, "--step", "1", "--add", "pinned"]) == 0
    (tmp_path / "run" / step_dirname(1) / "tags.json").write_text("{not json")
    capsys.readouterr()
    assert main(["prune", root, "--keep-last", "1", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["deleted"]) == [2]
    assert any(c["step"] == 1 and "tags.json" in c["error"] for c in doc["corrupt"])
    assert (tmp_path / "run" / step_dirname(1)).is_dir()


def test_the_sign_record_names_the_signer(tmp_path: Path) -> None:
    key, _ = make_keys(tmp_path)
    root = str(tmp_path / "run")
    save(root, 1, 1.0)
    assert main(["sign", root, "--step", "1", "--key", key]) == 0
    records, _ = read_trail(open_location(root), 1)
    signed = [r for r in records if r["event"] == "sign"]
    assert signed and signed[0]["detail"]["signer"] not in ("", "<redacted>")


def test_log_of_a_folder_that_is_not_a_root_exits_2(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["log", str(tmp_path)]) == 2


def test_an_audit_record_at_a_root_with_no_save_yet_is_written(tmp_path: Path) -> None:
    root = tmp_path / "persistent"
    assert append(open_location(str(root)), "restore_local", 8, "ok", {"tier": "local"})
    records, bad = read_trail(open_location(str(root)))
    assert [r["event"] for r in records] == ["restore_local"] and not bad
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:  # still a root
        mgr.save(9, state(9.0))
        assert mgr.steps() == [9]
    shutil.rmtree(root)


def test_a_trusted_load_deletes_the_local_steps_it_abandons(tmp_path: Path) -> None:
    key, pub = make_keys(tmp_path)
    root = str(tmp_path / "run")
    tier = shardckpt.LocalTier(str(tmp_path / "local" / "{node}"), every=1, copies=1, keep=3)
    with pytest.warns(UserWarning, match="single node"):
        with shardckpt.CheckpointManager(root, async_save=False, save_every=5,
                                         local=tier) as mgr:
            for step in (5, 6, 7):
                mgr.save(step, state(float(step)))
            assert mgr.steps(tier="local") == [5, 6, 7]
    assert main(["sign", root, "--step", "5", "--key", key]) == 0
    got = state(0.0)
    with pytest.warns(UserWarning, match=r"deleting the newer local step\(s\) 6, 7"):
        with shardckpt.CheckpointManager(root, trusted_keys=[pub], local=tier) as mgr:
            assert mgr.load(got) == 5
            assert mgr.steps(tier="local") == [5]
    assert torch.equal(got["w"], state(5.0)["w"])
