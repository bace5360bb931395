"""The atheris target ``tests/fuzz/fuzz_parsers.py``, exercised in the normal suite (without
atheris): its seeds are valid and its resealing really reaches the field validation, and its
``TestOneInput`` holds the contract (return, or raise a ``ShardckptError``) on a few hundred
hypothesis-generated and seeded random inputs across all of its modes."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.format import manifest as M
from shardckpt.format import shard as S

TARGET = Path(__file__).resolve().parent / "fuzz_parsers.py"
HYPOTHESIS_EXAMPLES = 500
RANDOM_INPUTS = 2000


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("shardckpt_fuzz_parsers", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


F = _load()


def test_target_runs_without_atheris() -> None:
    assert F.atheris is None or hasattr(F.atheris, "Fuzz")
    assert callable(F.TestOneInput) and len(F.MODES) == 7


def test_seeds_and_resealing_are_valid() -> None:
    """Unmutated, every resealing path yields bytes the parsers accept: the fuzzed modes
    start past the checksums, at the field validation."""
    manifest = M.parse(F.SEED_MANIFEST)
    assert manifest.step == 1
    assert F.reseal_manifest(F.manifest_body(F.SEED_MANIFEST)) == F.SEED_MANIFEST
    M.parse(F.reseal_manifest(F.dump(json.loads(F.manifest_body(F.SEED_MANIFEST)))))
    assert M.parse(F.reseal_manifest(F.dump(F.SEED_DOC))).tensors == manifest.tensors
    assert F.reseal_shard(F.SEED_SHARD_BEFORE, F.SEED_SHARD_HEADER) == F.SEED_SHARD
    header = F.reseal_shard(F.SEED_SHARD_BEFORE, F.dump(json.loads(F.SEED_SHARD_HEADER)))
    got = S.read_header(lambda o, n: header[o:o + n], len(header), F.SHARD_NAME)
    assert got.step == 1 and got.pieces


def test_mutations_are_refused_with_the_packages_error() -> None:
    """A lying field behind a correct checksum is caught by validation, not by the checksum."""
    doc = json.loads(F.manifest_body(F.SEED_MANIFEST))
    doc["world_size"] = 2**62
    with pytest.raises(shardckpt.CorruptCheckpointError, match="world_size"):
        M.parse(F.reseal_manifest(F.dump(doc)))
    head = json.loads(F.SEED_SHARD_HEADER)
    head["pieces"][0]["chunks"][0][0] = -1
    data = F.reseal_shard(F.SEED_SHARD_BEFORE, F.dump(head))
    with pytest.raises(shardckpt.ShardckptError):
        F.parse_shard(data)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.integers(0, 6), drive=st.binary(max_size=256))
def test_fuzz_target_hypothesis(mode: int, drive: bytes) -> None:
    F.TestOneInput(bytes([mode]) + drive)


def test_fuzz_target_seeded_random() -> None:
    table = copy.deepcopy(F.INTERESTING)
    inputs = F.random_inputs(RANDOM_INPUTS, seed=1)
    for data in inputs:
        F.TestOneInput(data)
    assert {d[0] % len(F.MODES) for d in inputs} == set(range(len(F.MODES)))
    assert F.INTERESTING == table, "an input changed the target's state for the next ones"


def test_finding_rank_run_of_the_wrong_length_is_corrupt() -> None:
    """Found by this target (atheris input ``QUEx1A==``): a tensor whose ``ranks`` run is not a
    ``[start, stop)`` pair must be a ``CorruptCheckpointError``, not a ``ValueError`` from
    unpacking it."""
    F.TestOneInput(base64.b64decode("QUEx1A=="))
    doc = json.loads(F.dump(F.SEED_DOC))
    entry = next((t for t in doc["tensors"].values() if "ranks" in t), None)
    if entry is None:
        pytest.skip("this manifest format has no per-tensor 'ranks' field")
    for bad in ([[0]], [[]], [[0, 1, 1]], [0], [[0, 1], [1]]):
        entry["ranks"] = bad
        with pytest.raises(shardckpt.CorruptCheckpointError):
            M.parse(F.reseal_manifest(F.dump(doc)))


def test_regression_inputs() -> None:
    """Inputs that once broke the target itself (shared state, deep nesting), run repeatedly."""
    crash = base64.b64decode("JePGxsbGxsbGxsbGxsbGxsbGxsbGxsbGxsbGxsbGxsbGxsbGxsb8QEA8PCE=")
    for _ in range(200):
        F.TestOneInput(crash)
