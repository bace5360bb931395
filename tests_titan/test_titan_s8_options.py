"""The torchtitan backend's shardckpt options added with incremental saves (issue 30) and the
node-local tier (issue 28): ``incremental``, ``full_every``, ``local_*``, ``trusted_keys``, and
how torchtitan's ``async_mode`` maps. The jobs run in one batch of 2 rank processes (a module
fixture, see titan_targets.option_runs) with torchtitan 0.3.0's real classes; the Config checks
and ``async_mode`` run in this process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import titan_targets as T
import torch

import shardckpt
from shardckpt.errors import ShardckptError
from shardckpt.integrations.torchtitan import ShardckptCheckpointManager, TitanConfigError

JOBS = T.option_runs  # the module's 2-rank jobs, run once: the ``runs`` fixture (conftest.py)
Config = ShardckptCheckpointManager.Config


def _same_as_reference(out: dict[str, Any], name: str, loaded: int) -> None:
    ref, got = out["ref"], out[name]
    assert got["loaded_step"] == loaded
    assert got["losses"] == {k: v for k, v in ref["losses"].items() if int(k) > loaded}
    for key in ("model", "optim", "lr", "step", "ntokens", "data"):
        assert got[key] == ref[key], (name, key)


def test_incremental_saves_write_less_and_resume_bit_identically(
        runs: list[dict[str, Any]], base: str) -> None:
    """A frozen first layer: the second save (step 6) references its bytes in step 3 and
    writes fewer bytes; the job resumed from step 6 ends bit-identical to the reference."""
    with shardckpt.CheckpointManager(T.root_of(f"{base}/inc")) as mgr:
        first, second = mgr.info(3), mgr.info(6)
        assert 9 in mgr.steps()  # the resumed job saves incrementally too
    assert first.depends_on == () and first.bytes_referenced == 0
    assert second.depends_on == (3,) and second.bytes_referenced > 0
    assert second.nbytes < first.nbytes
    for out in runs:
        _same_as_reference(out, "inc", 6)


def test_the_local_tier_saves_between_persistent_steps_and_resumes_from_them(
        runs: list[dict[str, Any]], base: str) -> None:
    """interval=5, local_every=2, local_keep=2, stopped after step 7: the persistent tier holds
    step 5, each node's local path steps 4 and 6; the job resumes from local step 6."""
    for rank, out in enumerate(runs):
        assert out["persistent_steps"] == [5]
        assert out["local_steps"] == [4, 6]
        assert (Path(base) / "local" / str(rank)).is_dir()  # local_node names the node
        _same_as_reference(out, "local", 6)
    with shardckpt.CheckpointManager(T.root_of(f"{base}/local")) as mgr:
        assert 6 not in mgr.steps() and T.TOTAL in mgr.steps()  # the last save: persistent


def _build(config: Any, tmp_path: Path) -> ShardckptCheckpointManager:
    return config.build(dataloader=None, model_parts=[torch.nn.Linear(2, 2)], optimizers=None,
                        lr_schedulers=None, states={}, base_folder=str(tmp_path))


@pytest.mark.parametrize("mode", ["disabled", "async", "async_with_pinned_mem"])
def test_async_mode_maps_to_blocking_or_background_saves(mode: str, tmp_path: Path) -> None:
    """"disabled" (torchtitan's default): save returns once the step is committed; "async"
    and "async_with_pinned_mem": once snapshotted, the write goes on in the background."""
    ckpt = _build(Config(enable=True, interval=2, async_mode=mode), tmp_path)
    try:
        assert ckpt.manager.async_save is (mode != "disabled")
        assert ckpt.save(2) is True
        if mode == "disabled":
            assert ckpt.manager.steps() == [2]  # committed before save returned
        ckpt.maybe_wait_for_saving()
        assert ckpt.manager.steps() == [2]
    finally:
        ckpt.close()


BAD = [
    {"async_mode": "sync"},
    {"incremental": "yes"},
    {"full_every": -1, "incremental": True},
    {"full_every": 5},  # without incremental
    {"local_every": 10},  # without local_path
    {"local_keep": 3},
    {"local_node": "a"},
    {"local_path": "/tmp/x/{node}"},  # without local_every
    {"local_path": "", "local_every": 2},
    {"local_path": "/tmp/x/{rank}", "local_every": 2},
    {"local_every": 0.5, "local_path": "/tmp/x"},
    {"local_copies": 0, "local_path": "/tmp/x", "local_every": 2},
    {"local_keep": -1, "local_path": "/tmp/x", "local_every": 2},
    {"local_node": "a/b", "local_path": "/tmp/x", "local_every": 2},  # not path-safe
    {"trusted_keys": "release.pub.pem"},  # a path, not a list of paths
    {"snapshot": "later"},
    {"on_error": "ignore"},
    {"export_dtype": "int8"},
    {"replicas": "/tmp/replica"},
    {"min_replicas": 0},
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()))
def test_bad_option_values_are_refused_naming_the_field(bad: dict[str, Any]) -> None:
    with pytest.raises(TitanConfigError) as info:
        Config(**bad)
    assert isinstance(info.value, ShardckptError) and isinstance(info.value, ValueError)
    assert f"checkpoint.{next(iter(bad))}" in str(info.value)  # the field at fault comes first


def test_what_only_the_manager_can_check_is_refused_when_it_is_built(tmp_path: Path) -> None:
    """A trusted key that is missing or no PEM key, a local path inside the checkpoint folder,
    a bad compression: TitanConfigError when the backend is built, nothing written."""
    (tmp_path / "junk.pem").write_text("not a key")
    for bad, says in (({"trusted_keys": [str(tmp_path / "missing.pem")]}, "missing.pem"),
                      ({"trusted_keys": [str(tmp_path / "junk.pem")]}, "not a PEM public key"),
                      ({"local_path": "checkpoint/local", "local_every": 2,
                        "local_copies": 1}, "overlaps"),
                      ({"compression": "gzip"}, "gzip")):
        with pytest.raises(TitanConfigError, match=says), \
                warnings.catch_warnings(action="ignore"):  # a local tier on a single node
            _build(Config(enable=True, **bad), tmp_path)
    assert not (tmp_path / "checkpoint").exists() or \
        not any((tmp_path / "checkpoint").glob("step-*"))


def test_the_new_options_default_to_what_checkpoint_manager_does() -> None:
    cfg = Config()
    assert (cfg.incremental, cfg.full_every, cfg.local_path, cfg.trusted_keys) == \
        (False, 0, None, [])
    assert cfg.async_mode == "disabled"  # the DCP backend's default: saves block
    assert Config(async_mode="ASYNC").async_mode == "async"  # case folded, as DCP's


def _keys(where: Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / "key.pem", where / "key.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(private), str(public)


def _job(tmp_path: Path, name: str, model: torch.nn.Module, **ckpt: Any
         ) -> ShardckptCheckpointManager:
    cfg = Config(**{"enable": True, "interval": 2, "keep_latest_k": 0,
                    "last_save_model_only": False, **ckpt})
    return cfg.build(dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                     states={}, base_folder=str(tmp_path / name))


def test_trusted_keys_load_only_signed_steps(tmp_path: Path) -> None:
    """Step 2 signed, step 4 not: a job with trusted_keys resumes from step 2 (its own folder)
    and starts from it (a shardckpt root as initial_load_path); a DCP or Hugging Face folder as
    initial_load_path, which cannot be signed, is refused."""
    from shardckpt.cli.main import main
    from shardckpt.integrations.torchtitan import TitanLoadError

    private, public = _keys(tmp_path)
    model = torch.nn.Linear(4, 4)
    job = _job(tmp_path, "run", model)
    values = {}
    for step in (2, 4):
        with torch.no_grad():
            model.weight.fill_(float(step))
        values[step] = model.weight.clone()
        job.save(step)
    job.close()
    root = str(tmp_path / "run" / "checkpoint")
    assert main(["sign", root, "--step", "2", "--key", private]) == 0
    for name, ckpt in (("run", {}), ("fresh", {"initial_load_path": root})):
        resumed = torch.nn.Linear(4, 4)
        job = _job(tmp_path, name, resumed, trusted_keys=[public], **ckpt)
        with pytest.warns(UserWarning, match="unsigned"):
            assert job.load() is True
        assert torch.equal(resumed.weight, values[2]), name  # not step 4: unsigned
        job.close()
    dcp = tmp_path / "dcp" / "step-6"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"")
    for ckpt in ({"initial_load_path": str(dcp), "trust_dcp_pickle": True},
                 {"initial_load_path": str(dcp.parent), "initial_load_in_hf": True}):
        job = _job(tmp_path, "refused", torch.nn.Linear(4, 4), trusted_keys=[public], **ckpt)
        with pytest.raises(TitanLoadError, match="cannot be signed"):
            job.load()
        job.close()


def test_the_first_step_checkpoint_is_persistent_with_a_local_tier(tmp_path: Path) -> None:
    """enable_first_step_checkpoint with local_every=1: step 1 goes to both tiers (the manager
    alone would write only the local one, the only one due); step 2 to the local tier only."""
    with warnings.catch_warnings(action="ignore"):  # a local tier on a single node
        job = _job(tmp_path, "first", torch.nn.Linear(4, 4), interval=5,
                   enable_first_step_checkpoint=True, local_path=str(tmp_path / "local"),
                   local_every=1, local_copies=1)
        try:
            assert job.save(1) and job.save(2)
            job.maybe_wait_for_saving()
            assert job.manager.steps() == [1]
            assert job.manager.steps(tier="local") == [1, 2]
        finally:
            job.close()
