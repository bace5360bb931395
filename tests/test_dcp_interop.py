"""DCP interop: ``shardckpt import-dcp`` (refused without ``--trust-pickle``) and
``export --format dcp``, round trips with plain, FSDP2-saved and optimizer state."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import interop_targets as IT
import pytest
import torch
import torch.distributed.checkpoint as dcp
from harness import run_ranks

import shardckpt
from shardckpt.cli.main import main
from shardckpt.interop import ConversionError
from shardckpt.interop import dcp as D

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


class NotPlain:
    """An object that a weights_only unpickler refuses."""

    def __init__(self) -> None:
        self.x = 1


def plain_state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {"layers.0.weight": torch.randn(5, 3, generator=gen),
                  "layers.0.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
                  "embed": torch.arange(12, dtype=torch.int32).reshape(3, 4),
                  "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5)},
        "optim": {"state": {"layers.0.weight": {"step": torch.tensor(3.0),
                                                "exp_avg": torch.ones(5, 3)}},
                  "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8,
                                    "params": ["layers.0.weight"]}]},
        "step": 42, "name": "run-7", "loss": 1.25, "nothing": None, "tokens": [1, 2, 3],
        "nested": {"a": {"b": "deep"}},
    }


def assert_same(got: Any, want: Any, where: str = "") -> None:
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), f"{where}: {set(got) ^ set(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want, where


class Touch:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_import_is_refused_without_trust_pickle(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dcp"
    dcp.save(plain_state(), checkpoint_id=str(src), no_dist=True)
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(Touch(str(marker)))).close()  # the payload is live
    marker.unlink()
    (src / ".metadata").write_bytes(pickle.dumps(Touch(str(marker))))
    root = tmp_path / "root"
    assert main(["import-dcp", str(src), str(root), "--step", "3"]) == 64
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "pickle" in err and "--trust-pickle" in err and "arbitrary code" in err
    assert not root.exists()
    with pytest.raises(ConversionError, match="trust_pickle=True"):
        D.import_dcp(src, str(root), 3)
    with pytest.raises(ConversionError, match="trust_pickle=True"):
        D.read_dcp(src)
    assert not marker.exists()  # nothing was unpickled


def test_plain_state_round_trip(tmp_path: Path, capsys) -> None:
    src, root, out = tmp_path / "dcp", str(tmp_path / "root"), tmp_path / "out"
    state = plain_state()
    dcp.save(state, checkpoint_id=str(src), no_dist=True)
    assert main(["import-dcp", str(src), root, "--step", "3", "--trust-pickle", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 3 and doc["tensors"] == 7 and doc["values"] == 13

    # what was imported is the state that was saved, through shardckpt's own load
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [3]
        loaded: dict[str, Any] = {k: None for k in state}
        loaded["model"] = {}
        assert mgr.load(loaded) == 3
    assert_same(loaded, state)
    flat = shardckpt.consolidated_state_dict(root, only="model")
    assert_same(flat, state["model"])

    # and export --format dcp writes what dcp.load reads back into a state of that shape
    assert main(["export", root, "--format", "dcp", "--out", str(out)]) == 0
    template = plain_state()
    for k, v in template["model"].items():
        template["model"][k] = torch.zeros_like(v)
    template["optim"]["state"]["layers.0.weight"]["exp_avg"] = torch.zeros(5, 3)
    template["step"] = template["name"] = None
    dcp.load(template, checkpoint_id=str(out), no_dist=True)
    assert_same(template, state)
    assert_same(D.read_dcp(out, trust_pickle=True), state)

    # --only: the subtree, its prefix stripped, as dcp.load(model.state_dict()) expects
    assert main(["export", root, "--format", "dcp", "--only", "model", "--out", str(out)]) == 0
    assert_same(D.read_dcp(out, trust_pickle=True), state["model"])


@pytest.fixture(scope="module")
def fsdp_dcp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("fsdp_dcp")
    src, ref = str(d / "dcp"), str(d / "ref.safetensors")
    results = run_ranks(IT.dcp_fsdp_save, 2, src, ref, timeout=240, env=ENV)
    return {"dir": d, "src": src, "ref": ref, "next_loss": [r["next_loss"] for r in results]}


def test_fsdp2_dcp_checkpoint_imports_and_resumes(fsdp_dcp: dict[str, Any]) -> None:
    """An FSDP2 job's DCP checkpoint (model and optimizer through get_state_dict, 2 ranks)
    becomes a shardckpt checkpoint that a 2-rank FSDP2 job resumes from: every parameter and
    optimizer tensor equal, and the next step's loss bitwise the same."""
    root = str(fsdp_dcp["dir"] / "imported")
    assert main(["import-dcp", fsdp_dcp["src"], root, "--step", "2", "--trust-pickle"]) == 0
    results = run_ranks(IT.fsdp_resume, 2, root, fsdp_dcp["ref"], timeout=240, env=ENV)
    assert results[0]["problems"] == []
    assert [r["step"] for r in results] == [2, 2]
    assert results[0]["train_state"] == {"step": 2, "tokens": [48, 96]}
    assert [r["next_loss"] for r in results] == fsdp_dcp["next_loss"]


def test_fsdp2_state_exported_as_dcp_loads_into_fsdp2(fsdp_dcp: dict[str, Any]) -> None:
    """Import, then export --format dcp: a 2-rank FSDP2 job dcp.loads the export."""
    root, out = str(fsdp_dcp["dir"] / "imported2"), str(fsdp_dcp["dir"] / "exported")
    D.import_dcp(fsdp_dcp["src"], root, 7, trust_pickle=True)
    result = shardckpt.export(root, format="dcp", out=out)
    assert result.step == 7 and result.files == (".metadata", "__0_0.distcp")
    results = run_ranks(IT.fsdp_load_dcp_export, 2, out, fsdp_dcp["ref"], timeout=240, env=ENV)
    assert results[0]["problems"] == []
    assert results[0]["train_state"] == {"step": 2, "tokens": [48, 96]}


def test_items_that_need_a_full_unpickler_are_refused(tmp_path: Path, capsys) -> None:
    src, root = tmp_path / "dcp", tmp_path / "root"
    dcp.save({"w": torch.ones(2), "extra": {"obj": NotPlain()}}, checkpoint_id=str(src),
             no_dist=True)
    assert main(["import-dcp", str(src), str(root), "--step", "1", "--trust-pickle"]) == 64
    err = capsys.readouterr().err
    assert "'extra.obj'" in err and "weights_only=True" in err, err
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == []  # nothing was committed


def test_import_never_replaces_a_committed_step(tmp_path: Path, capsys) -> None:
    src, root = tmp_path / "dcp", str(tmp_path / "root")
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(src), no_dist=True)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(5, {"w": torch.zeros(3)})
    assert main(["import-dcp", str(src), root, "--step", "5", "--trust-pickle"]) == 64
    assert "step 5 is already committed" in capsys.readouterr().err
    assert torch.equal(shardckpt.consolidated_state_dict(root)["w"], torch.zeros(3))
    assert main(["import-dcp", str(tmp_path), root, "--step", "6", "--trust-pickle"]) == 64
    assert "not a DCP checkpoint folder" in capsys.readouterr().err


def test_dcp_export_refuses_a_folder_that_is_not_a_previous_export(tmp_path: Path,
                                                                   capsys) -> None:
    root = str(tmp_path / "root")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    theirs = tmp_path / "theirs"  # someone's own DCP checkpoint
    dcp.save({"w": torch.full((2,), 9.0)}, checkpoint_id=str(theirs), no_dist=True)
    before = sorted(os.listdir(theirs))
    assert main(["export", root, "--format", "dcp", "--out", str(theirs)]) == 64
    assert "not a previous shardckpt DCP export" in capsys.readouterr().err
    assert sorted(os.listdir(theirs)) == before
    assert torch.equal(D.read_dcp(theirs, trust_pickle=True)["w"], torch.full((2,), 9.0))
    # into a folder of its own, again and again
    out = tmp_path / "ours"
    for _ in range(2):
        assert main(["export", root, "--format", "dcp", "--out", str(out)]) == 0
    assert torch.equal(D.read_dcp(out, trust_pickle=True)["w"], torch.ones(2))


def test_a_state_dict_stored_as_plain_dicts_loads_into_a_module_and_an_optimizer(
        tmp_path: Path) -> None:
    """What an import stores ({"model": {...}, "optim": {...}}, plain dicts) restores live
    objects in place; it used to replace them in the state with dicts, restoring nothing."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        optim = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(2, 3)).sum().backward()
        optim.step()
        return model, optim

    model, optim = build(0)
    msd, osd = get_state_dict(model, optim)
    root = str(tmp_path / "root")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"model": dict(msd), "optim": osd})
    model2, optim2 = build(1)
    state: dict[str, Any] = {"model": model2, "optim": optim2}
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.load(state)
    assert state["model"] is model2 and state["optim"] is optim2
    assert_same(dict(model2.state_dict()), dict(model.state_dict()))
    assert_same(optim2.state_dict(), optim.state_dict())
