"""Unit tests of ``shardckpt.repro``: RNG capture/restore, determinism, provenance, loader position.

Everything runs in one process on CPU. CUDA paths are exercised with ``torch.cuda`` monkeypatched
(capture and restore must call the right functions without initializing CUDA). Values meant for
checkpoints are round-tripped through the checkpoint tree's JSON encoding (tensors kept aside),
and once through a real ``CheckpointManager`` save and load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    TensorDataset,
    get_worker_info,
)

import shardckpt
from shardckpt.planning import tree as T
from shardckpt.planning.restore import rebuild
from shardckpt.repro import (
    REDACTED,
    SamplerPosition,
    capture_rng_state,
    collect_provenance,
    describe_mesh,
    determinism_record,
    git_state,
    host_record,
    installed_distributions,
    is_secret_name,
    is_stateful_dataloader,
    make_generator,
    redact_argv,
    redact_tree,
    restore_rng_state,
    seed_worker,
    set_determinism,
)
from shardckpt.repro import determinism as determinism_module
from shardckpt.repro import provenance as provenance_module

# ----------------------------------------------------------------------------- helpers


def assert_storable(value: Any, path: str = "") -> None:
    """Only JSON scalars, str-keyed dicts, lists and CPU tensors (what a checkpoint stores)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str, f"{path}: key {k!r}"
            assert_storable(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_storable(v, f"{path}/{i}")
    elif isinstance(value, torch.Tensor):
        assert value.device.type == "cpu", path
    else:
        assert value is None or type(value) in (bool, int, float, str), f"{path}: {type(value)}"


def tree_roundtrip(value: Any) -> Any:
    """``value`` through the checkpoint tree's JSON (tensors cloned aside, as shards would be)."""
    tensors: dict[str, torch.Tensor] = {}

    def on_leaf(v: Any, path: str) -> list[Any] | None:
        if isinstance(v, torch.Tensor):
            tensors[path] = v.clone()
            return ["T", path]
        return None

    node = json.loads(json.dumps(T.encode(value, "", on_leaf), allow_nan=False))
    return rebuild(node, "", lambda key, where: tensors[key].clone(), 0, 1)


def draws() -> tuple[float, float, float, float, list[float]]:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()),
            float(np.random.standard_normal()), torch.rand(3).tolist())


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's and NumPy's states
    np.random.standard_normal()


@pytest.fixture
def keep_global_rng() -> Iterator[None]:
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(th)


# ----------------------------------------------------------------------------- rng


def test_capture_consumes_nothing(keep_global_rng: None) -> None:
    seed_all(11)
    expected = draws()
    seed_all(11)
    value = capture_rng_state()
    assert draws() == expected
    assert_storable(value)
    assert value["cuda"] == []  # CPU only, and capture must not initialize CUDA
    assert not torch.cuda.is_initialized()


def test_restore_replays_every_generator(keep_global_rng: None) -> None:
    seed_all(5)
    value = capture_rng_state()
    first = draws()
    assert draws() != first
    assert restore_rng_state(value) == []
    assert draws() == first


def test_restore_after_checkpoint_tree_roundtrip(keep_global_rng: None) -> None:
    seed_all(6)
    value = tree_roundtrip(capture_rng_state())
    first = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert restore_rng_state(value) == []
    assert draws() == first


def test_captured_state_is_a_copy(keep_global_rng: None) -> None:
    seed_all(7)
    value = capture_rng_state()
    python, numpy_key, cpu = (value["python"]["internal"].clone(), value["numpy"]["key"].clone(),
                              value["torch"].clone())
    draws()
    assert torch.equal(value["python"]["internal"], python)
    assert torch.equal(value["numpy"]["key"], numpy_key)
    assert torch.equal(value["torch"], cpu)


@pytest.mark.parametrize(("mutate", "names"), [
    (lambda v: v.update(format=2), "format"),
    (lambda v: v.update(python=[1, 2]), "python"),
    (lambda v: v["python"].update(internal=v["python"]["internal"].float()), "python.internal"),
    (lambda v: v["python"].update(internal=v["python"]["internal"][:10]), "python.internal"),
    (lambda v: v["python"].update(version="3"), "python"),
    (lambda v: v["numpy"].update(algorithm="PCG64"), "numpy"),
    (lambda v: v["numpy"]["key"].__setitem__(0, -1), "numpy.key"),
    (lambda v: v["numpy"].update(pos_has_gauss=torch.tensor([9999, 0])), "numpy.pos"),
    (lambda v: v.update(torch=torch.zeros(5056, dtype=torch.uint8)), "torch: invalid"),
    (lambda v: v.update(torch=v["torch"][:-1]), "torch"),
    (lambda v: v.update(torch=[1, 2, 3]), "torch"),
    (lambda v: v.update(cuda=torch.zeros(3)), "cuda"),
    (lambda v: v.update(cuda=[torch.zeros(16, dtype=torch.int64)]), "cuda:0"),
])
def test_restore_rejects_malformed_state_and_changes_nothing(keep_global_rng: None, mutate: Any,
                                                              names: str) -> None:
    seed_all(8)
    value = capture_rng_state()
    mutate(value)
    if not names.startswith("torch"):  # a valid change, not to be applied as another part is bad
        value["torch"] = torch.Generator().manual_seed(99).get_state()
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        restore_rng_state(value)
    assert torch.equal(torch.get_rng_state(), before)


def test_restore_rejects_non_mapping() -> None:
    with pytest.raises(ValueError, match="rng state"):
        restore_rng_state([1, 2])  # type: ignore[arg-type]


def test_restore_reports_generators_it_cannot_restore(keep_global_rng: None) -> None:
    value = capture_rng_state()
    value["numpy"] = None  # e.g. a per-rank tensor the loader skipped
    value["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2 + [None]
    value["mps"] = torch.zeros(4, dtype=torch.uint8)
    value["python"]["gauss_next"] = None
    missing = restore_rng_state(value)
    assert missing == ["python", "numpy", "cuda:0", "cuda:1", "cuda:2", "mps"]
    del value["python"]["gauss_next"]
    with pytest.raises(ValueError, match="python: missing 'gauss_next'"):
        restore_rng_state(value)


def test_cuda_states_captured_and_restored_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    calls: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: states[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    value = capture_rng_state()
    assert [s.tolist() for s in value["cuda"]] == [s.tolist() for s in states]
    assert restore_rng_state({"format": 1, "cuda": value["cuda"]}) == ["cuda:1"]
    assert len(calls) == 1 and calls[0][1] == 0 and torch.equal(calls[0][0], states[0])
    with pytest.raises(ValueError, match="cuda:0"):
        restore_rng_state({"format": 1, "cuda": [torch.zeros(8, dtype=torch.uint8)]})


def test_cuda_not_read_unless_initialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("initialized CUDA"))
    assert capture_rng_state()["cuda"] == []


# ----------------------------------------------------------------------------- determinism


@pytest.fixture
def keep_determinism(monkeypatch: pytest.MonkeyPatch, keep_global_rng: None) -> Iterator[None]:
    flags = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(determinism_module, "_record", None)
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2], flags[3]


def test_set_determinism_sets_and_records(keep_determinism: None) -> None:
    assert determinism_record() is None
    record = set_determinism(1234, warn_only=True)
    assert random.random() == random.Random(1234).random()
    assert np.random.rand() == np.random.RandomState(1234).rand()
    assert torch.equal(torch.rand(4), torch.rand(4, generator=make_generator(1234)))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert record == {
        "seed": 1234,
        "seeded": {"python": True, "numpy": True, "torch": True,
                   "cuda": torch.cuda.is_available()},
        "deterministic_algorithms": True, "warn_only": True,
        "env": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
        "cudnn": {"benchmark": False, "deterministic": True},
    }
    assert json.loads(json.dumps(record)) == record
    record["seed"] = 0
    assert determinism_record()["seed"] == 1234  # a copy, not the kept record


def test_set_determinism_keeps_the_other_deterministic_cublas_value(
        keep_determinism: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert set_determinism(1)["env"] == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert set_determinism(1)["env"] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize("seed", [-1, 1 << 32, True, 1.0, "1"])
def test_bad_seed(seed: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        set_determinism(seed)
    with pytest.raises(ValueError, match="seed"):
        make_generator(seed)


def test_seed_worker_derives_from_torch_seed(keep_global_rng: None) -> None:
    torch.manual_seed(77)
    seed_worker(0)
    assert random.random() == random.Random(77).random()
    assert np.random.rand() == np.random.RandomState(77).rand()


# ------------------------------------------------------------------------ redaction, provenance

MARKERS = {name: f"MARKER-{name}-{os.getpid()}" for name in
           ("aws", "hf", "myapi", "nccl", "cfg", "nested", "argv1", "argv2", "argv3", "url", "data",
            "hydra", "shaped")}


def test_secret_names() -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MY_API_KEY", "wandb_api_key", "hf-token",
                 "db.password", "GOOGLE_APPLICATION_CREDENTIALS", "NCCL_AUTH", "private_path"):
        assert is_secret_name(name), name
    assert is_secret_name("tokenizer_token") and is_secret_name("HF_TOKENIZER")
    for name in ("lr", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "batch_size", "OMP_NUM_THREADS",
                 "tokenizer", "--tokenizer-name", "author"):
        assert not is_secret_name(name), name


def test_redact_argv_forms() -> None:
    argv = ["train.py", "--token", "s1", "--lr", "0.1", "--api-key=s2", "-p", "x",
            "db.password=s3", "--auth", "--epochs", "3", "--private-key", "-5"]
    assert redact_argv(argv) == [
        "train.py", "--token", REDACTED, "--lr", "0.1", f"--api-key={REDACTED}", "-p", "x",
        f"db.password={REDACTED}", "--auth", "--epochs", "3", "--private-key", REDACTED]


def test_redact_tree_validates_and_converts() -> None:
    out = redact_tree({"a": (1, 2.5, None, True), "b": {"secret": [1]}, "c": float("nan"),
                       "d": np.int64(3), "e": float("-inf")})
    assert out == {"a": [1, 2.5, None, True], "b": {"secret": REDACTED}, "c": "NaN", "d": 3,
                   "e": "-Infinity"}
    with pytest.raises(TypeError, match=r"config\.x\[1\]"):
        redact_tree({"x": [1, {1, 2}]})
    with pytest.raises(TypeError, match="not a str"):
        redact_tree({1: 2})


@pytest.fixture
def hostile_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MARKERS["aws"])
    monkeypatch.setenv("HF_TOKEN", MARKERS["hf"])
    monkeypatch.setenv("MY_API_KEY", MARKERS["myapi"])
    monkeypatch.setenv("NCCL_AUTH_TOKEN", MARKERS["nccl"])  # allow-listed prefix, secret name
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("SHARDCKPT_IO_THREADS", "3")
    monkeypatch.setattr(sys, "argv", [
        str(tmp_path / "train.py"), f"--hf-token={MARKERS['argv1']}", "--token", MARKERS["argv2"],
        "--api_key", MARKERS["argv3"], f"--data=s3://user:{MARKERS['url']}@bucket/x",
        f"wandb.api_key={MARKERS['hydra']}", "--lr", "0.1",
        "--note=hf_" + "A" * 30])
    MARKERS["shaped"] = "hf_" + "A" * 30


def test_provenance_is_json_and_has_no_secret(hostile_env: None) -> None:
    prov = collect_provenance(
        world_size=2, mesh=SimpleNamespace(mesh=torch.arange(4).reshape(2, 2),
                                           mesh_dim_names=("dp", "tp"), device_type="cpu"),
        config={"wandb_api_key": MARKERS["cfg"], "lr": 0.1,
                "logger": {"password": MARKERS["nested"], "project": "p"}},
        data={"fingerprint": "sha256:0123", "preprocessing": {"hf_token": MARKERS["data"],
                                                              "max_len": 512}})
    text = json.dumps(prov, allow_nan=False)
    for marker in MARKERS.values():
        assert marker not in text
    assert json.loads(text) == prov
    for key in ("format", "python", "platform", "torch", "accelerators", "host", "world_size",
                "mesh", "determinism", "command", "code", "config", "data", "packages", "env"):
        assert key in prov
    assert prov["torch"]["version"] == torch.__version__
    assert prov["torch"]["git_version"] == torch.version.git_version
    assert prov["torch"]["cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert prov["torch"]["nccl"] is None and prov["accelerators"]["devices"] == []
    assert prov["world_size"] == 2
    assert prov["mesh"] == {"shape": [2, 2], "dim_names": ["dp", "tp"], "device_type": "cpu",
                            "ranks": [[0, 1], [2, 3]]}
    assert prov["config"] == {"wandb_api_key": REDACTED, "lr": 0.1,
                              "logger": {"password": REDACTED, "project": "p"}}
    assert prov["data"]["fingerprint"] == "sha256:0123"
    assert prov["data"]["preprocessing"] == {"hf_token": REDACTED, "max_len": 512}
    assert prov["env"]["NCCL_AUTH_TOKEN"] == REDACTED
    assert prov["env"]["NCCL_DEBUG"] == "INFO" and prov["env"]["SHARDCKPT_IO_THREADS"] == "3"
    for name in ("MASTER_ADDR", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MY_API_KEY", "HOME", "PATH"):
        assert name not in prov["env"]
    argv = prov["command"]["argv"]
    assert f"--hf-token={REDACTED}" in argv and "--lr" in argv and "0.1" in argv
    assert f"--data=s3://{REDACTED}@bucket/x" in argv
    assert prov["host"] == {**host_record(), "pid": os.getpid()}
    assert {"name": "torch", "version": torch.__version__} in [
        {"name": p["name"], "version": p["version"]} for p in prov["packages"]]


def test_provenance_timing_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The expensive parts (the scan of installed distributions, the process's static facts)
    are computed once per process: counted, not timed."""
    from shardckpt.repro import distributions as distributions_module

    scans = []
    real_scan = distributions_module._scan
    monkeypatch.setattr(distributions_module, "_cache", None)
    monkeypatch.setattr(distributions_module, "_scan", lambda: scans.append(1) or real_scan())
    provenance_module._static.cache_clear()
    one = collect_provenance(world_size=1)
    two = collect_provenance(world_size=1)
    assert len(scans) == 1, "the distributions were scanned again: the cache missed"
    assert provenance_module._static.cache_info().misses == 1
    assert one["packages"] == two["packages"] and one["python"] == two["python"]
    first = installed_distributions()
    first[0]["version"] = "changed"
    assert installed_distributions()[0]["version"] != "changed"


def test_provenance_reads_devices_from_nvidia_smi_without_cuda(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559, 550.54.15'\n"
                   "echo '1, NVIDIA H100 80GB HBM3, 81559, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: pytest.fail("CUDA init"))
    provenance_module._smi_gpus.cache_clear()
    try:
        acc = collect_provenance(world_size=1)["accelerators"]
    finally:
        provenance_module._smi_gpus.cache_clear()
    assert acc == {"driver": "550.54.15", "source": "nvidia-smi", "devices": [
        {"index": str(i), "name": "NVIDIA H100 80GB HBM3", "memory_mib": "81559"} for i in (0, 1)]}


def test_provenance_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        collect_provenance(world_size=0)
    with pytest.raises(TypeError, match=r"config\.path"):
        collect_provenance(world_size=1, config={"path": Path("/x")})
    with pytest.raises(TypeError, match="data"):
        collect_provenance(world_size=1, data=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mesh"):
        describe_mesh(object())
    assert describe_mesh((2, 4))["shape"] == [2, 4]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_git_state_inside_and_outside_a_work_tree(isolated_git: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    outside = isolated_git / "plain"
    outside.mkdir()
    assert git_state(outside) is None
    repo = isolated_git / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    assert git_state(repo)["revision"] is None  # no commit yet: no error either
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "one")
    _git(repo, "remote", "add", "origin", "https://user:s3cr3t@example.com/r.git")
    clean = git_state(repo)
    assert clean == {"revision": _git(repo, "rev-parse", "HEAD"), "branch": "main",
                     "dirty": False, "untracked_files": 0,
                     "diff_sha256": hashlib.sha256(b"").hexdigest(),
                     "remote": f"https://{REDACTED}@example.com/r.git"}
    (repo / "notes.txt").write_text("x")
    assert git_state(repo)["untracked_files"] == 1 and not git_state(repo)["dirty"]
    (repo / "train.py").write_text("print(2)\n")
    dirty = git_state(repo)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo, capture_output=True,
                          check=True).stdout
    assert dirty["dirty"] is True and dirty["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    assert dirty["diff_sha256"] != clean["diff_sha256"]

    monkeypatch.setattr(sys, "argv", ["not-a-file.py"])
    monkeypatch.chdir(repo)
    code = collect_provenance(world_size=1)["code"]
    assert code["revision"] == clean["revision"] and code["source"] == "cwd"
    monkeypatch.chdir(outside)
    assert collect_provenance(world_size=1)["code"] is None
    monkeypatch.setattr(sys, "argv", [str(repo / "train.py")])  # the script's repo wins
    assert collect_provenance(world_size=1)["code"]["source"] == "script"
    monkeypatch.setenv("PATH", str(outside))  # no git at all: still no error
    assert git_state(repo) is None


# ----------------------------------------------------------------------------- data position


def _run(position: SamplerPosition, make_loader: Any, epochs: int,
         stop_after: int | None = None) -> list[list[int]]:
    """Batches as lists, from ``position`` on, up to ``epochs``; stop after ``stop_after``."""
    out: list[list[int]] = []
    loader = make_loader()
    while position.epoch < epochs:
        for batch in position.epoch_iterator(loader):
            out.append(torch.cat([b.flatten() for b in batch]).tolist()
                       if isinstance(batch, list) else batch.flatten().tolist())
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def test_sampler_position_resumes_distributed_sampler_with_workers() -> None:
    dataset = TensorDataset(torch.arange(100))

    def make_loader() -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=1)
        return DataLoader(dataset, sampler=sampler, batch_size=4, num_workers=2)

    reference = _run(SamplerPosition(), make_loader, epochs=3)
    per_epoch = 13  # 50 samples of rank 0, batches of 4
    assert len(reference) == 3 * per_epoch and reference[0] != reference[per_epoch]
    first = SamplerPosition()
    stop = per_epoch + per_epoch // 2  # 1.5 epochs
    assert _run(first, make_loader, epochs=3, stop_after=stop) == reference[:stop]
    saved = tree_roundtrip(first.state_dict())
    assert saved["epoch"] == 1 and saved["batches_consumed"] == per_epoch // 2
    resumed = SamplerPosition()
    resumed.load_state_dict(saved)
    assert _run(resumed, make_loader, epochs=3) == reference[stop:]


class NoisyRange(Dataset):
    """Item i is ``[i, noise]``, the noise drawn in a worker (0 in the main process)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        noise = torch.rand(()).item() if get_worker_info() is not None else 0.0
        return torch.tensor([float(i), noise])


# mid-epoch (random items drawn in workers), at an epoch's end, before anything
@pytest.mark.parametrize(("stop", "workers"), [(7, 2), (12, 0), (0, 0)])
def test_sampler_position_resumes_seeded_random_sampler(stop: int, workers: int) -> None:
    def make_loader() -> DataLoader:
        return DataLoader(NoisyRange(), batch_size=4, shuffle=True, num_workers=workers,
                          generator=make_generator(3), worker_init_fn=seed_worker)

    reference = _run(SamplerPosition(), make_loader, epochs=3)
    assert reference[:6] != reference[6:12]  # 6 batches an epoch, shuffled differently
    first = SamplerPosition()
    if stop:
        assert _run(first, make_loader, epochs=3, stop_after=stop) == reference[:stop]
    if stop == 12:  # an epoch boundary: the loop has not yet asked for epoch 2's first batch
        assert first.epoch == 1 and first.batches_consumed == 6
    resumed = SamplerPosition()
    resumed.load_state_dict(tree_roundtrip(first.state_dict()))
    assert _run(resumed, make_loader, epochs=3) == reference[stop:]


def test_sampler_position_between_epochs_and_validation() -> None:
    def make_loader() -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(8)), batch_size=4, shuffle=True,
                          generator=make_generator(5))

    reference = _run(SamplerPosition(), make_loader, epochs=3)
    first = SamplerPosition()
    loader = make_loader()
    got = [b[0].tolist() for b in first.epoch_iterator(loader)]  # exactly one whole epoch
    assert first.state_dict()["epoch"] == 1 and first.batches_consumed == 0
    resumed = SamplerPosition()
    resumed.load_state_dict(tree_roundtrip(first.state_dict()))
    assert got + _run(resumed, make_loader, epochs=3) == reference
    with pytest.raises(ValueError, match="generator"):
        wrong = SamplerPosition()
        wrong.load_state_dict(first.state_dict())
        next(wrong.epoch_iterator(DataLoader(TensorDataset(torch.arange(8)), batch_size=4)))
    for bad in ({"epoch": -1, "batches_consumed": 0}, {"epoch": 0}, [1],
                {"epoch": 0, "batches_consumed": 0, "generator_states": [torch.zeros(2)]}):
        with pytest.raises(ValueError, match="SamplerPosition"):
            SamplerPosition().load_state_dict(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SamplerPosition().advance(-1)


def test_sampler_position_hand_written_loop() -> None:
    pos = SamplerPosition()
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=2)
    pos.begin_epoch(loader)
    for _ in loader:
        pos.advance()
    assert pos.state_dict()["batches_consumed"] == 4
    pos.next_epoch(loader)
    assert (pos.epoch, pos.batches_consumed) == (1, 0)


# ----------------------------------------------------------------------------- torchdata

@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_state_is_storable(workers: int) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> Any:
        return stateful.StatefulDataLoader(NoisyRange(), batch_size=4, shuffle=True,
                                           num_workers=workers, generator=make_generator(9))

    # Only the item order is compared: StatefulDataLoader restores the order and the workers'
    # base seed, but not how far each worker's generator had advanced, so random augmentations
    # drawn in workers (column 1 here) differ after a resume (torchdata 0.11).
    reference = [b[:, 0].tolist() for b in make()]
    loader = make()
    assert is_stateful_dataloader(loader) and not is_stateful_dataloader(DataLoader([1]))
    it = iter(loader)
    head = [next(it)[:, 0].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert_storable(state)
    fresh = make()
    fresh.load_state_dict(tree_roundtrip(state))
    assert head + [b[:, 0].tolist() for b in fresh] == reference


# ----------------------------------------------------------------------------- with the manager


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_rng_and_loader_state_through_checkpoint_manager(tmp_path: Path,
                                                         keep_global_rng: None) -> None:
    loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=4, shuffle=True,
                        generator=make_generator(2))
    pos = SamplerPosition()
    it = pos.epoch_iterator(loader)
    next(it)
    seed_all(3)
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        mgr.save(1, {"rng": capture_rng_state(), "data": pos})
    expected_draws = draws()
    expected_batches = [b[0].tolist() for b in it]

    restored_pos = SamplerPosition()
    state: dict[str, Any] = {"rng": {}, "data": restored_pos}
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.load(state) == 1
    assert restore_rng_state(state["rng"]) == []
    assert draws() == expected_draws
    fresh = DataLoader(TensorDataset(torch.arange(12)), batch_size=4, shuffle=True,
                       generator=make_generator(2))
    assert [b[0].tolist() for b in restored_pos.epoch_iterator(fresh)] == expected_batches
