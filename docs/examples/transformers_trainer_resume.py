"""Hugging Face Trainer + shardckpt: train, stop, resume, and check the result bit for bit.

    python docs/examples/transformers_trainer_resume.py WORKDIR
    torchrun --nproc-per-node 2 docs/examples/transformers_trainer_resume.py WORKDIR   # DDP

Three ``train()`` calls of a tiny ``LlamaForCausalLM`` built from a config (nothing is
downloaded; attention dropout on, AdamW, a linear schedule, a shuffled synthetic dataset),
each from a freshly built model and Trainer:

1. the reference: 10 steps without interruption and without checkpoints;
2. the same training with a ``ShardckptCallback`` and ``save_steps=3``, stopped after step 5
   (as a preemption would stop it; the last checkpoint is step 3, in the middle of the first
   epoch of 6 steps);
3. the same configuration again, resumed with ``ckpt.prepare_resume(trainer)``: it continues
   from step 3 and trains to step 10.

It exits 0 only if the losses of steps 4 to 10 and the final weights of the resumed run equal
the reference's bitwise (on every rank, under ``torchrun``: DDP over gloo on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import shardckpt
from shardckpt.integrations.transformers import ShardckptCallback

STEPS, STOP_AFTER, SAVE_STEPS = 10, 5, 3


class LossRecordingTrainer(Trainer):
    """Records each optimizer step's loss (gradient accumulation is 1 here)."""

    losses: dict[int, float]

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses[self.state.global_step + 1] = loss.item()
        return loss


class StopAfter(TrainerCallback):
    """Ends training after a given step, as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        if state.global_step >= self.step:
            control.should_training_stop = True


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (24, 16), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(workdir: Path, callbacks: list[TrainerCallback]) -> LossRecordingTrainer:
    set_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, attention_dropout=0.1)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
        save_strategy="steps" if callbacks else "no", save_steps=SAVE_STEPS, report_to=[],
        use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = LossRecordingTrainer(model=LlamaForCausalLM(config), args=args,
                                   train_dataset=dataset(), callbacks=callbacks)
    trainer.losses = {}
    ckpt = next((cb for cb in callbacks if isinstance(cb, ShardckptCallback)), None)
    resume = ckpt.prepare_resume(trainer) if ckpt is not None else None
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    root = str(args.workdir / "ckpt")

    reference = train(args.workdir, [])
    train(args.workdir, [StopAfter(STOP_AFTER), ShardckptCallback(root)])
    ckpt = ShardckptCallback(root, retention=shardckpt.RetentionPolicy(keep_last=2))
    resumed = train(args.workdir, [ckpt])

    rank = dist.get_rank() if dist.is_initialized() else 0
    steps = sorted(resumed.losses)
    same_losses = all(resumed.losses[s] == reference.losses[s] for s in steps)
    same_weights = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                         reference.model.state_dict().values()))
    expected = SAVE_STEPS * (STOP_AFTER // SAVE_STEPS)
    ok = ckpt.resumed_step == expected and steps == list(range(expected + 1, STEPS + 1)) \
        and same_losses and same_weights
    print(f"rank {rank}: resumed from step {ckpt.resumed_step}, steps {steps[0]}-{steps[-1]}: "
          f"losses {'equal' if same_losses else 'DIFFER'}, "
          f"weights {'equal' if same_weights else 'DIFFER'}", flush=True)
    if dist.is_initialized():  # every rank exits with the verdict of all
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        ok = flag.item() == 0
    with shardckpt.CheckpointManager(root) as manager:  # collective, like every manager
        kept = manager.steps()
    if rank == 0:
        print(f"checkpoints kept: {kept}")
        print("OK: the resumed run matches the uninterrupted one bitwise" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
