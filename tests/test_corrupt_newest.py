"""Issue 25 items 4 and 7: a corrupt newest step never blocks a restart (2 ranks, real gloo
processes).

Steps 1 and 2 are saved by a 2-rank job; then rank 1's shard file of step 2 is damaged: a byte
flipped inside a data chunk (found while reading, after some tensors already hold step 2's
bytes) or the file cut in half (found while planning, before any byte is written). Then:

* ``load(step=2)`` raises ``CorruptCheckpointError`` on every rank, and the message says whether
  the state is partly loaded or unchanged;
* ``load()`` resumes from step 1 on every rank together, every key filled again (bit for bit),
  with a warning on rank 0 naming step 2 and the damaged file;
* rank 0 has moved step 2 aside (``step-0000000002.corrupt-<utc>``), so ``steps()`` is ``[1]``
  and the job saves step 2 again, and resumes from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import crash_targets
import load_check_targets as T
import pytest
from harness import run_ranks

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
       "SHARDCKPT_CHUNK_SIZE": "4K"}  # several chunks per shard file
ASIDE = re.compile(r"step-0000000002\.corrupt-\d{8}T\d{6}Z")


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with crash_targets.forked_ranks():
        yield


@pytest.mark.parametrize("how", ["chunk", "truncate"])
def test_corrupt_newest_step_falls_back_and_is_moved_aside(tmp_path: Path, how: str) -> None:
    root = tmp_path / "ck"
    results = run_ranks(T.corrupt_newest, 2, str(root), how, timeout=150, env=ENV)
    damaged = results[0]["damaged"]
    for rank, got in enumerate(results):
        explicit = got["explicit"]
        assert explicit is not None, (rank, got)
        assert explicit["corrupt"], explicit  # a CorruptCheckpointError on every rank
        assert "load of step 2 failed" in explicit["message"], explicit
        assert damaged in explicit["message"], explicit
        if how == "chunk":  # found while reading: some tensors hold bytes of step 2
            assert "partly loaded" in explicit["message"], explicit
        else:  # found while planning: nothing was written
            assert "the state is unchanged" in explicit["message"], explicit
            assert explicit["changed"] == [], explicit
        assert got["fallback_step"] == 1, got
        assert got["fallback_problems"] == [], got  # every key again, bit for bit
        assert got["steps_after"] == [1], got
        assert got["resumed_step"] == 2 and got["resumed_problems"] == [], got
    warned = [w for w in results[0]["warnings"] if "step 2 cannot be loaded" in w]
    assert warned and damaged in warned[0] and "loading step 1 instead" in warned[0], \
        results[0]["warnings"]
    assert any("moved aside" in w for w in results[0]["warnings"]), results[0]["warnings"]
    listing = results[0]["listing"]
    assert sum(bool(ASIDE.fullmatch(n)) for n in listing) == 1, listing
    assert "step-0000000002" not in listing, listing  # before the new save of step 2
    aside = next(n for n in listing if ASIDE.fullmatch(n))
    assert (root / aside / damaged).exists()  # kept for inspection
    assert (root / "step-0000000002" / "manifest.json").exists()  # saved again
