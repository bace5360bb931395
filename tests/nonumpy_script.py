"""Save and load with shardckpt where NumPy is not installed (run by tests/test_nonumpy.py).

usage: ``nonumpy_script.py ROOT`` under plain ``python`` (one process) or ``torchrun`` (each rank
also saves a tensor of its own, so the collectives carry real payloads). Runs in a fresh venv
holding torch and shardckpt only: it must not import anything from the tests.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

import shardckpt


def make_state(rank: int) -> dict:
    g = torch.Generator().manual_seed(11)
    return {"model": {"w": torch.randn(64, 32, generator=g),
                      "h": torch.randn(40, generator=g).to(torch.bfloat16),
                      "t": torch.randn(8, 6, generator=g).t(),  # not contiguous
                      "mask": torch.rand(17, generator=g) > 0.5},
            "mine": torch.full((5,), rank, dtype=torch.int64),
            "progress": {"step": 3, "lr": 0.5}}


def main() -> None:
    root = sys.argv[1]
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("numpy is importable here: this test proves nothing")
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    want = make_state(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(root) as mgr:
            mgr.save(3, want).wait()
            mgr.save(4, want, blocking=True)
        got = {"model": {k: torch.zeros_like(v) for k, v in want["model"].items()},
               "mine": torch.zeros(5, dtype=torch.int64), "progress": {}}
        with shardckpt.CheckpointManager(root) as mgr:
            assert mgr.steps() == [3, 4], mgr.steps()
            assert mgr.load(got) == 4
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["mine"], want["mine"])
    assert got["progress"] == want["progress"]
    noise = [str(w.message) for w in caught]
    assert not noise, noise  # e.g. no "RNG state not restored for ['numpy']"
    os.write(1, f"rank {rank}: saved and loaded without numpy\n".encode())


if __name__ == "__main__":
    main()
