"""A small training job that checkpoints with shardckpt and resumes from the latest checkpoint.

Run under torchrun (FSDP2 over gloo on CPU, or NCCL on GPUs) or as a plain single process:

    torchrun --standalone --nproc-per-node 2 launch/demo.py --root demo_run/ckpt --steps 20

SIGTERM (preemption, scancel) and SIGUSR1 (Slurm's time-limit warning) make it save the current
step with a blocking save, print one line and exit 0, to resume from there when restarted.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn

import shardckpt

VOCAB, DIM = 101, 48


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied, as in most language models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class StopSignal:
    """Set by SIGTERM or SIGUSR1; :meth:`agreed` is the same on every rank (the ranks see the
    signal at slightly different steps, while ``save`` needs the same step everywhere)."""

    def __init__(self) -> None:
        self.name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on)

    def _on(self, signum: int, frame: object) -> None:
        self.name = self.name or signal.Signals(signum).name

    def agreed(self, distributed: bool) -> bool:
        if not distributed:
            return self.name is not None
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(self.name is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # microseconds next to a step
        return bool(flag.item() > 0)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 7919 + rank)
    x = torch.randint(0, VOCAB, (8, 16), generator=g)
    return x, (x * 3 + 1) % VOCAB  # a learnable mapping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True, help="checkpoint root (path or fsspec URL)")
    ap.add_argument("--steps", type=int, default=20, help="train until this step")
    ap.add_argument("--save-every", type=int, default=5)
    args = ap.parse_args()

    stop = StopSignal()  # before anything slow: a signal from now on means "save and exit"
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = TinyLM()
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=100)
    progress = {"step": 0}
    state = {"model": model, "optim": optim, "sched": sched, "progress": progress}

    retention = shardckpt.RetentionPolicy(keep_last=2, keep_every=10)
    with shardckpt.CheckpointManager(args.root, save_every=args.save_every,
                                     retention=retention) as mgr:
        if mgr.latest_step() is not None:
            step = mgr.load(state)
            if rank == 0:
                print(f"resumed from step {step} (lr {sched.get_last_lr()[0]:.6f})", flush=True)
        stopped = False
        while progress["step"] < args.steps:
            x, y = batch(progress["step"], rank)
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            optim.step()
            sched.step()
            optim.zero_grad()
            progress["step"] += 1
            if rank == 0:
                print(f"step {progress['step']:3d}  loss {loss.item():.6f}", flush=True)
            if stop.agreed(distributed):
                mgr.save(progress["step"], state, metrics={"loss": loss.item()}, blocking=True)
                stopped = True
                break
            if mgr.should_save(progress["step"]):
                mgr.save(progress["step"], state, metrics={"loss": loss.item()})
    mgr.close()  # collective: the last save commits before the process group goes away
    if rank == 0 and stopped:
        print(f"{stop.name or 'stop signal'} (preemption or time limit): saved step "
              f"{progress['step']}, exiting to resume from it", flush=True)
    elif rank == 0:
        print(f"done at step {progress['step']}; checkpoints: {mgr.steps()}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
