"""A training job for the resume tests: dropout, a shuffled 2-worker DataLoader, AdamW, a
scheduler, checkpointing with shardckpt. Runs under torchrun (FSDP2) or as one process.

    repro_train.py --root R --steps N [--save-at K --die-after-save] [--mode M] --out OUT_PREFIX

``--mode blocking`` saves with ``blocking=True``; ``eager`` and ``lazy`` save asynchronously with
that snapshot mode, and training goes on for one more step (forward, backward, optimizer step)
while the save runs before ``--die-after-save`` waits for its commit and kills the process.
Without ``--save-at`` nothing is saved (an uninterrupted reference run). Each rank writes its
losses to ``OUT_PREFIX.rankR.json`` (a killed run: those of the steps run before the kill); rank 0
the final full model and optimizer state to ``OUT_PREFIX.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

import shardckpt
from shardckpt.repro import make_generator, seed_worker

SEED = 1234


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 48)
        self.drop = nn.Dropout(0.3)
        self.hidden = nn.Linear(48, 48)
        self.out = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.inp(x)))
        return self.out(self.drop(torch.relu(self.hidden(h))))


def _write_losses(out: str, rank: int, losses: dict[int, str]) -> None:
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(losses, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--die-after-save", action="store_true")
    ap.add_argument("--mode", choices=("blocking", "eager", "lazy"), default="blocking")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    shardckpt.set_determinism(SEED + rank)
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(120, 16, generator=g), torch.randint(0, 5, (120,),
                                                                          generator=g))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=SEED) \
        if distributed else RandomSampler(data, generator=make_generator(SEED))
    loader = DataLoader(data, batch_size=8, sampler=sampler, num_workers=2,
                        worker_init_fn=seed_worker, generator=make_generator(SEED + rank),
                        persistent_workers=False)
    torch.manual_seed(SEED)
    model = Net()
    if distributed:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.hidden)
        fully_shard(model)
    torch.manual_seed(SEED + rank)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.7)
    position = shardckpt.SamplerPosition()
    progress = {"step": 0}
    state = {"model": model, "optim": optim, "sched": sched, "data": position,
             "progress": progress}
    losses: dict[int, str] = {}
    snapshot = "eager" if args.mode == "eager" else "lazy"
    pending = None
    with shardckpt.CheckpointManager(args.root, snapshot=snapshot) as mgr:
        if mgr.latest_step() is not None:
            mgr.load(state)
        while progress["step"] < args.steps:
            for x, y in position.epoch_iterator(loader):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optim.step()
                sched.step()
                optim.zero_grad()
                progress["step"] += 1
                losses[progress["step"]] = loss.item().hex()
                if pending is not None and args.die_after_save:
                    pending.wait()  # committed, while this step ran alongside the save
                    _write_losses(args.out, rank, losses)  # what ran until the kill
                    os.kill(os.getpid(), signal.SIGKILL)
                if progress["step"] == args.save_at:
                    blocking = args.mode == "blocking"
                    pending = mgr.save(progress["step"], state, blocking=blocking)
                    if blocking and args.die_after_save:
                        _write_losses(args.out, rank, losses)
                        os.kill(os.getpid(), signal.SIGKILL)
                if progress["step"] >= args.steps:
                    break
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    tensors = {f"model/{k}": v for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, optim, options=full)
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"optim/{fqn}/{name}"] = torch.as_tensor(v)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{args.out}.safetensors")
    _write_losses(args.out, rank, losses)
    if distributed:
        # Every rank's collectives (the full-state-dict gathers above) finish before any rank
        # tears down: a gloo worker still completing one while its interpreter finalizes can
        # abort the process at exit (seen as SIGABRT, "terminate called without an active
        # exception"), after the run's own results were written.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
