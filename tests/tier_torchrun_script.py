"""A worker of a simulated multi-node job (tests/test_tier_torchrun.py): started by one of
several ``torchrun --nnodes N --node-rank i`` agents on 127.0.0.1. The node id comes from
torchrun's GROUP_RANK. ``save ROOT``: local saves of steps 1-3 (and step 2 persistently);
``recover ROOT``: restore across tiers, with an audit hook against other nodes' paths. Each rank
writes its result to ROOT/result-RANK.json."""

from __future__ import annotations

import json
import os
import sys

import tier_targets as T
import torch.distributed as dist


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes = [None] * world
    dist.all_gather_object(nodes, os.environ["GROUP_RANK"])  # test-side only: node ids
    if mode == "save":
        T.save_both(rank, world, root, nodes, [1, 2, 3], 2)
        result = {"node": os.environ["GROUP_RANK"]}
    else:
        result = T.recover_job(rank, world, root, nodes)
    with open(os.path.join(root, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
