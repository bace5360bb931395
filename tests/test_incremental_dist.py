"""Incremental saves at 2 ranks (gloo): every step loads alone at 2, 3 and 1 ranks, bit for
bit; an S3 replica (moto) behaves as the root, also when it missed the base step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import incremental_targets as T
import pytest
from harness import run_ranks
from incremental_helpers import load_step, lora_state, read_doc

import shardckpt
from shardckpt.format import refs as R

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "SHARDCKPT_FSYNC": "0",
       "SHARDCKPT_CHUNK_SIZE": str(64 << 10)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Any]]:
    root = str(tmp_path_factory.mktemp("incdist") / "run")
    results = run_ranks(T.save_steps, 2, root, [1, 2, 3, 4, 5], timeout=240, env=ENV)
    return root, results[0]


def test_two_ranks_write_only_what_changed(saved: tuple[str, list[Any]]) -> None:
    _, infos = saved
    full = infos[0][1]
    assert infos[0][2] == []
    for _, nbytes, depends in infos[1:]:
        assert depends == [1] and nbytes < 0.25 * full


@pytest.mark.parametrize("world", [2, 3])
def test_every_step_loads_alone_at_m_ranks(saved: tuple[str, list[Any]], world: int) -> None:
    root, _ = saved
    for step in (2, 5):
        results = run_ranks(T.load_and_compare, world, root, step, timeout=240, env=ENV)
        assert results == [[]] * world


def test_every_step_loads_alone_in_one_process(saved: tuple[str, list[Any]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = saved
    for step in (1, 3, 5):
        load_step(root, step, lora_state(step))


def test_s3_replica_behaves_as_the_root_even_when_it_missed_the_base(
        tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    root, replica = str(tmp_path / "run"), s3.new_root()
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        mgr.save(1, lora_state(1))  # the replica misses step 1
    with shardckpt.CheckpointManager(root, replicas=[replica], async_save=False,
                                     incremental=True,
                                     storage_options=s3.storage_options) as mgr:
        a = mgr.save(2, lora_state(2)).wait()  # no base committed at both: full
        b = mgr.save(3, lora_state(3)).wait()  # base 2, at both locations
    assert a is not None and a.depends_on == () and b is not None and b.depends_on == (2,)
    assert R.depends_on(read_doc(root, 3), 3) == [2]
    for loc in (root, replica):
        with shardckpt.CheckpointManager(loc, async_save=False,
                                         storage_options=s3.storage_options) as mgr:
            assert mgr.steps()[-2:] == [2, 3]
        load_step(loc, 3, lora_state(3), storage_options=s3.storage_options)
