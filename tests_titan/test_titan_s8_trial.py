"""What a hands-on user trial of the torchtitan backend found (issue 29, session 8): a finished
run relaunched, a step resumed below newer ones, a DCP folder where shardckpt expects its own,
and Config values of the wrong type. The 2-rank jobs run in one batch (a module fixture, see
titan_targets.trial_runs) with torchtitan 0.3.0's real classes; the Config checks run here.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import titan_targets as T

import shardckpt
from shardckpt.integrations.torchtitan import (
    MODEL_ONLY,
    ShardckptCheckpointManager,
    TitanConfigError,
)

JOBS = T.trial_runs  # the module's 2-rank jobs, run once: the ``runs`` fixture (conftest.py)
Config = ShardckptCheckpointManager.Config


def test_relaunching_a_finished_run_refuses_its_model_only_last_step(
        runs: list[dict[str, Any]], base: str) -> None:
    """The last save of a finished run is model-only (torchtitan's default
    last_save_model_only=True, here in bfloat16): relaunching the job refuses to resume from
    it, before anything loads, naming the step, why, the newest full step and what to do."""
    root = T.root_of(f"{base}/fin")
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [3, 6, 9, T.TOTAL] and MODEL_ONLY in mgr.info(T.TOTAL).tags
    for out in runs:
        got = out["relaunch"]
        assert got["type"] == "TitanLoadError" and got["step"] == 0
        msg = got["msg"]
        assert f"the newest committed step, {T.TOTAL}" in msg and root in msg
        assert "last_save_model_only" in msg and "cannot resume training" in msg
        assert "newest full step is 9" in msg and "load_step=9" in msg
        assert f"initial_load_path={root}" in msg and "initial_load_model_only=True" in msg
        assert "optimizer" in msg and "train_state" in msg  # what the step lacks


def test_relaunching_a_run_finished_with_last_save_in_hf_is_refused(
        runs: list[dict[str, Any]], base: str) -> None:
    """last_save_in_hf: the last step (10) holds HF names; the relaunch is refused rather than
    resuming silently from the older full step 5 (whose next save, 10, would collide)."""
    root = T.root_of(f"{base}/hf")
    for out in runs:
        got = out["hf"]
        assert got["type"] == "TitanLoadError" and got["step"] == 0
        assert "last_save_in_hf" in got["msg"] and "newest full step is 5" in got["msg"]
        assert f"initial_load_path={os.path.join(root, 'hf', f'step-{T.TOTAL}')}" in got["msg"]
        assert "initial_load_in_hf=True" in got["msg"]


def test_load_step_naming_a_model_only_step_is_refused_unless_the_rest_is_excluded(
        runs: list[dict[str, Any]]) -> None:
    """load_step=10 (model-only): refused; with exclude_from_loading naming all the state the
    step lacks, its model loads (bfloat16 into the float32 model) and nothing else does."""
    for out in runs:
        got = out["explicit"]
        assert got["type"] == "TitanLoadError" and f"load_step={T.TOTAL} holds" in got["msg"]
        excluded = out["excluded"]
        assert excluded["loaded"] and excluded["step"] == 0 and excluded["data"] == 0
        assert excluded["model"] == out["fin_bf16"] != out["fin"]["model"]


def test_fine_tuning_from_a_finished_run_as_the_refusal_says(runs: list[dict[str, Any]]) -> None:
    """A new folder with initial_load_path=<the finished run's folder> (model only, the
    default): its bfloat16 model-only step loads into the float32 model."""
    for out in runs:
        assert out["tune"]["loaded"] and out["tune"]["step"] == 0
        assert out["tune"]["model"] == out["fin_bf16"]


def test_saving_at_or_below_the_newest_step_names_the_likely_cause(
        runs: list[dict[str, Any]], base: str) -> None:
    """Resumed from step 6 (load_step) in a folder holding steps up to 10: the save of step 9
    is refused by the backend, naming the folder, the step and the older resume (not another
    writer), and the committed steps stay as they were."""
    root = T.root_of(f"{base}/fin")
    for out in runs:
        msg = out["older"]["msg"]
        assert out["older"]["step"] == 9
        assert root in msg and "cannot save step 9" in msg and f"up to {T.TOTAL}" in msg
        assert "load_step" in msg and "another writer" not in msg
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [3, 6, 9, T.TOTAL]


def test_a_folder_of_dcp_checkpoints_is_refused_not_treated_as_empty(
        runs: list[dict[str, Any]], base: str) -> None:
    """checkpoint.folder holding torchtitan DCP steps: refused when the manager is built,
    naming the folder and the steps, and nothing of shardckpt's is written next to them."""
    root = T.root_of(f"{base}/dcp")
    for out in runs:
        got = out["dcp_folder"]
        assert got["type"] == "TitanConfigError"
        assert root in got["msg"] and "step-3" in got["msg"]
        assert f"initial_load_path={os.path.join(root, 'step-3')}" in got["msg"]
        assert "trust_dcp_pickle=True" in got["msg"]
    assert sorted(os.listdir(root)) == ["step-3"]


def test_initial_load_path_at_a_dcp_run_folder_lists_its_steps(
        runs: list[dict[str, Any]], base: str) -> None:
    for out in runs:
        got = out["dcp_root"]
        assert got["type"] == "TitanLoadError" and "DCP run folder" in got["msg"]
        assert os.path.join(T.root_of(f"{base}/dcp"), "step-3") in got["msg"]


@pytest.mark.parametrize(("fields", "says"), [
    ({"replicas": "/other/ckpt"}, "checkpoint.replicas must be a list of locations"),
    ({"trust_dcp_pickle": "yes"}, "checkpoint.trust_dcp_pickle must be True or False"),
    ({"last_save_model_only": "no"}, "checkpoint.last_save_model_only must be True or False"),
    ({"incremental": "no"}, "checkpoint.incremental must be True or False"),
    ({"replicas": ["/r1"], "min_replicas": 3}, "checkpoint.min_replicas=3 is more than the 2"),
    ({"min_replicas": 2}, "checkpoint.min_replicas=2 is more than the 1"),
    ({"load_step": -2}, "checkpoint.load_step must be a step"),
    ({"keep_latest_k": "3"}, "checkpoint.keep_latest_k must be an int"),
    ({"keep_latest_k": 2.5}, "checkpoint.keep_latest_k must be an int"),
    ({"interval": "500"}, "checkpoint.interval must be an int"),
    ({"interval": True}, "checkpoint.interval must be an int"),
    ({"folder": 5}, "checkpoint.folder must be a path"),
    ({"initial_load_path": 5}, "checkpoint.initial_load_path must be a path"),
    ({"exclude_from_loading": "optimizer"}, "checkpoint.exclude_from_loading must be a list"),
])
def test_config_values_of_the_wrong_type_are_refused(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(TitanConfigError, match=says):
        Config(enable=True, **fields)
