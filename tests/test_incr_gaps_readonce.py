"""Read-once loads and incremental saves (issue 30, a gap of a user trial): a corrupt chunk
that one rank reads for the others is noted as corrupt on *every* rank, so that no rank of a
later incremental save references the damaged file (engine/badfiles.py, engine/readonce.py).

The base *step* of a save is chosen by rank 0 alone; whether a chunk of it may be referenced is
decided on each rank from its notes of corrupt files, so the notes must agree."""

from __future__ import annotations

from pathlib import Path

import incr_gaps_targets as T
from harness import run_ranks

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "SHARDCKPT_FSYNC": "0",
       "SHARDCKPT_CHUNK_SIZE": str(64 << 10), "SHARDCKPT_READ_ONCE": "1"}


def test_every_rank_notes_a_corrupt_file_one_rank_read_for_all(tmp_path: Path) -> None:
    ranks = run_ranks(T.corrupt_base_then_save, 2, str(tmp_path / "run"), timeout=240, env=ENV)
    name = ranks[0]["file"]
    for r in ranks:
        assert r["file"] == name and r["load"] == "CorruptLoadError", r
        assert r["noted"], r  # before the fix: only on the rank that read the chunk
        assert name not in r["step3_references"], r  # no rank bases on the damaged file
