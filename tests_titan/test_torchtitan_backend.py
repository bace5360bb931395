"""The shardckpt backend inside torchtitan 0.3.0 (issue 29), with torchtitan's real classes on
CPU at 2 ranks (gloo): see titan_targets.py for the job. The scenarios run in four batches of
rank processes (module fixtures), each test checks one promise on their results: process
start-up with torch, torchtitan and transformers is what costs, not the tiny model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import harness
import pytest
import titan_targets as T
import torch

import shardckpt
from shardckpt.integrations.torchtitan import HF, MODEL_ONLY, ShardckptCheckpointManager

TIMEOUT = 240.0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("titan"))


@pytest.fixture(scope="module")
def resume(base: str) -> dict[str, Any]:
    with pytest.raises(harness.RankFailures, match=r"SIGKILL|signal 9|died"):
        harness.run_ranks(T.first_runs, 2, base, timeout=TIMEOUT)
    first = [json.loads(Path(base, f"first-{r}.json").read_text()) for r in range(2)]
    resumed = harness.run_ranks(T.resumed_runs, 2, base, timeout=TIMEOUT)
    return {"first": first, "ranks": resumed}


@pytest.fixture(scope="module")
def fields(base: str) -> dict[str, Any]:
    seed = harness.run_ranks(T.seed_run, 1, base, timeout=TIMEOUT)[0]
    ranks = harness.run_ranks(T.field_runs, 2, base, timeout=TIMEOUT)
    return {"seed": seed, "ranks": ranks}


def steps(root: str) -> list[int]:
    with shardckpt.CheckpointManager(root) as mgr:
        return mgr.steps()


def _after(losses: dict[str, float], step: int) -> dict[str, float]:
    return {k: v for k, v in losses.items() if int(k) > step}


# ------------------------------------------------------------------------ save, kill, resume

def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(
        resume: dict[str, Any], base: str) -> None:
    for rank, out in enumerate(resume["ranks"]):
        ref, got = resume["first"][rank]["ref"], out["shard"]
        assert got["loaded_step"] in (3, 6)  # 6 unless the kill beat its background write
        assert _after(got["losses"], got["loaded_step"]) == \
            _after(ref["losses"], got["loaded_step"]), rank
        for key in ("model", "optim", "lr", "step", "ntokens"):
            assert got[key] == ref[key], (rank, key)
    assert not resume["first"][0]["ref_written"]  # enable=False writes nothing
    assert set(steps(T.root_of(f"{base}/shard"))) >= {6, 9, 10}


def test_the_dcp_backend_gives_the_same_results(resume: dict[str, Any]) -> None:
    """The same job with torchtitan's own DCP CheckpointManager (sync, on CPU): its resumed run
    and ours end in the same bits, both equal to the uninterrupted run."""
    for rank, out in enumerate(resume["ranks"]):
        assert out["dcp"]["loaded_step"] == 6
        assert out["dcp"]["losses"] == _after(resume["first"][rank]["ref"]["losses"], 6)
        for key in ("model", "optim", "lr", "step", "ntokens"):
            assert out["dcp"][key] == out["shard"][key] == resume["first"][rank]["ref"][key], key


def test_a_dcp_checkpoint_as_initial_load_path_loads_bit_identically(
        resume: dict[str, Any]) -> None:
    at6 = resume["first"][0]["dcp_first"]["at"]  # the DCP backend's state right after step 6
    for out in resume["ranks"]:
        assert out["from_dcp"]["loaded"] and out["from_dcp"]["model"] == at6["model"]
        assert out["from_dcp"]["step"] == 0  # model only (initial_load_model_only=True)
        full = out["from_dcp_full"]
        assert (full["model"], full["optim"], full["step"], full["lr"]) == \
            (at6["model"], at6["optim"], 6, at6["lr"])


def test_a_dcp_folder_is_refused_unless_trusted(resume: dict[str, Any]) -> None:
    for out in resume["ranks"]:
        assert "trust_dcp_pickle" in out["refused"] and "pickle" in out["refused"]


# ------------------------------------------------------------------------ one per Config field

def test_keep_latest_k_keeps_that_many_and_shardckpt_options_apply(
        fields: dict[str, Any], base: str) -> None:
    """keep_latest_k=2, interval=2 over 10 steps; replicas, zstd, a lazy snapshot, on_error."""
    assert steps(T.root_of(f"{base}/keep")) == [8, 10]
    assert steps(f"{base}/keep-replica") == [8, 10]
    with shardckpt.CheckpointManager(T.root_of(f"{base}/keep")) as mgr:
        extra = json.dumps(mgr.manifest(10).extra)  # the torchtitan config, in the provenance
    assert '"compression": "zstd"' in extra and '"snapshot": "lazy"' in extra


def test_a_shardckpt_root_as_initial_load_path(fields: dict[str, Any]) -> None:
    for out in fields["ranks"]:
        assert out["from_root"]["loaded"] and out["from_root"]["step"] == 0
        assert out["from_root"]["model"] == out["keep"]["model"]  # its newest step, model only


def test_interval_and_enable_first_step_checkpoint(base: str, fields: dict[str, Any]) -> None:
    assert steps(T.root_of(f"{base}/first")) == [1, 4]


def test_load_only_loads_and_never_saves(fields: dict[str, Any], base: str) -> None:
    for out in fields["ranks"]:
        assert (out["load_only"]["loaded_step"], out["load_only"]["step"]) == (4, 7)
    assert steps(T.root_of(f"{base}/first")) == [1, 4]


def test_load_step_loads_that_step(fields: dict[str, Any]) -> None:
    for out in fields["ranks"]:
        assert out["load_step"]["loaded_step"] == 1 and out["load_step"]["data"] == 2


def test_exclude_from_loading(fields: dict[str, Any]) -> None:
    for out in fields["ranks"]:
        assert out["no_loader"]["loaded_step"] == 4 and out["no_loader"]["data"] == 0
        assert out["load_only"]["data"] == 2 * 7  # restored at 8, then 3 steps of 2 samples
        assert out["no_optim"]["loaded_step"] == 4
        assert out["no_optim"]["optim"] == out["fresh"]["optim"]
        assert out["no_optim"]["model"] != out["fresh"]["model"]


def test_last_save_model_only_with_export_dtype(fields: dict[str, Any], base: str) -> None:
    with shardckpt.CheckpointManager(T.root_of(f"{base}/last")) as mgr:
        assert mgr.steps() == [5, 10]
        assert MODEL_ONLY in mgr.info(10).tags and MODEL_ONLY not in mgr.info(5).tags
        last, full = mgr.manifest(10), mgr.manifest(5)
    assert {k for k in last.tree[1] if not k.startswith("__shardckpt")} == {"model"}
    assert {"model", "optimizer", "lr_scheduler", "dataloader", "train_state"} <= \
        set(full.tree[1])
    model = {k: e for k, e in last.tensors.items() if k.startswith("model/")}
    assert model and {e.meta.dtype for e in model.values()} == {"bfloat16"}


def test_create_seed_checkpoint_loads_into_a_sharded_job(fields: dict[str, Any],
                                                         base: str) -> None:
    with shardckpt.CheckpointManager(T.root_of(f"{base}/seed")) as mgr:
        assert mgr.steps() == [0] and MODEL_ONLY in mgr.info(0).tags
    for out in fields["ranks"]:
        assert out["seed"]["model"] == fields["seed"]["model"]
        assert out["seed"]["loaded_step"] == 0


def test_last_save_in_hf_is_a_folder_transformers_loads(fields: dict[str, Any],
                                                        base: str) -> None:
    from transformers import LlamaForCausalLM

    folder = os.path.join(T.root_of(f"{base}/hf"), "hf", f"step-{T.TOTAL}")
    model = LlamaForCausalLM.from_pretrained(folder)
    assert T.digest(model.state_dict()) == fields["ranks"][0]["hf"]["model"]
    with shardckpt.CheckpointManager(T.root_of(f"{base}/hf")) as mgr:
        assert HF in mgr.info(T.TOTAL).tags


def test_initial_load_in_hf_through_the_sd_adapter(fields: dict[str, Any]) -> None:
    for out in fields["ranks"]:
        assert out["from_hf"]["loaded"] and out["from_hf"]["model"] == out["hf"]["model"]


# ------------------------------------------------------------------------ config checks

def test_config_checks_its_fields() -> None:
    cfg = ShardckptCheckpointManager.Config
    assert cfg().snapshot == "eager" and cfg().on_error == "raise"  # the safe defaults
    for bad in ({"snapshot": "later"}, {"on_error": "ignore"}, {"keep_latest_k": 1},
                {"export_dtype": "int8"}):
        with pytest.raises(ValueError):
            cfg(**bad)
    disabled = cfg(enable=False).build(
        dataloader=None, model_parts=[torch.nn.Linear(2, 2)], optimizers=None,
        lr_schedulers=None, states={})
    assert disabled.save(5) is False and disabled.load() is False
    disabled.close()
