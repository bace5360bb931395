"""Lightning + shardckpt: train, stop, resume, and check the result bit for bit.

    python docs/examples/lightning_resume.py WORKDIR [--devices 2]

Three ``fit`` calls of a tiny model (with dropout, AdamW, a step LR schedule and a shuffling,
stateful data loader), each from a fresh model:

1. the reference: 12 steps without interruption and without checkpoints;
2. the same training with a ``ShardckptCallback`` saving every 3 steps, stopped after step 7
   (as a preemption would stop it; the last checkpoint is step 6, in the middle of an epoch);
3. the same configuration again: it resumes from step 6 and trains to step 12.

It exits 0 only if the losses of steps 7 to 12 and the final weights of the resumed run equal
the reference's bitwise. ``--devices 2`` runs each fit on 2 CPU processes (DDP over gloo,
launched by Lightning).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import shardckpt
from shardckpt.integrations.lightning import ShardckptCallback

STEPS, STOP_AFTER, EVERY = 12, 7, 3


class TinyRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.losses: dict[int, float] = {}  # optimizer step (1-based) -> this rank's loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses[self.global_step + 1] = loss.item()
        return loss

    def train_dataloader(self) -> StatefulDataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 8, generator=g)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(80, 1, generator=g)
        data = TensorDataset(x, y)
        # Shuffled by (seed, epoch), each rank its share; the stateful loader lets a run
        # resumed mid-epoch continue with the next batch. Lightning starts the data iterator
        # of a resumed run before it sets the sampler's epoch, hence set_epoch here.
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=0)
        sampler.set_epoch(self.trainer.current_epoch)
        return StatefulDataLoader(data, batch_size=8, sampler=sampler)

    def configure_optimizers(self) -> dict:
        optim = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=4, gamma=0.5)
        return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopAfter(L.Callback):
    """Ends training after a given step, as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(devices: int, workdir: Path, callbacks: list[L.Callback]) -> TinyRegressor:
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS, use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=any(isinstance(cb, ShardckptCallback) for cb in callbacks),
        default_root_dir=str(workdir), callbacks=callbacks)
    trainer.fit(model)
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)
    root = args.workdir / "ckpt"

    reference = fit(args.devices, args.workdir, [])
    fit(args.devices, args.workdir,
        [StopAfter(STOP_AFTER), ShardckptCallback(str(root), every_n_train_steps=EVERY)])
    resume = ShardckptCallback(str(root), every_n_train_steps=EVERY,
                               retention=shardckpt.RetentionPolicy(keep_last=2))
    resumed = fit(args.devices, args.workdir, [resume])

    rank = dist.get_rank() if dist.is_initialized() else 0
    steps = sorted(resumed.losses)
    same_losses = all(resumed.losses[s] == reference.losses[s] for s in steps)
    same_weights = all(torch.equal(a, b) for a, b in
                       zip(resumed.state_dict().values(), reference.state_dict().values()))
    ok = resume.resumed_step == EVERY * (STOP_AFTER // EVERY) and steps == list(
        range(resume.resumed_step + 1, STEPS + 1)) and same_losses and same_weights
    print(f"rank {rank}: resumed from step {resume.resumed_step}, steps {steps[0]}-{steps[-1]}: "
          f"losses {'equal' if same_losses else 'DIFFER'}, weights "
          f"{'equal' if same_weights else 'DIFFER'}", flush=True)
    if dist.is_initialized():  # every rank exits with the verdict of all
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        ok = flag.item() == 0
    with shardckpt.CheckpointManager(str(root)) as manager:  # collective, like every manager
        kept = manager.steps()
    if rank == 0:
        print(f"checkpoints kept: {kept}")
        print("OK: the resumed run matches the uninterrupted one bitwise" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
