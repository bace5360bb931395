"""LoRA-style fine-tuning with incremental checkpoints: only what training changes is written.

    python docs/examples/lora_finetune.py WORKDIR [--steps 12] [--save-every 3]

A frozen "pretrained" stack of Linear layers gets a low-rank adapter per layer; only the
adapters train (AdamW). The manager saves with ``incremental=True``: after the first save, each
checkpoint writes the adapters and their optimizer state and references the frozen weights of
the first save, yet every checkpoint loads alone. Then a fresh model resumes from the last
checkpoint and the script checks the weights bit for bit, and prints what each save wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import shardckpt

WIDTH, LAYERS, RANK = 512, 8, 8


class LoRALinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(WIDTH, WIDTH)
        self.base.requires_grad_(False)  # frozen: the same bytes at every save
        self.lora_a = nn.Parameter(torch.randn(RANK, WIDTH) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(WIDTH, RANK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same "pretrained" base every time
    model = nn.Sequential(*[LoRALinear() for _ in range(LAYERS)])
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    args = p.parse_args()
    root = str(Path(args.workdir) / "ckpt")
    model, optim = build(seed=1)
    g = torch.Generator().manual_seed(2)
    with shardckpt.CheckpointManager(root, incremental=True, save_every=args.save_every,
                                     async_save=False) as mgr:
        for step in range(1, args.steps + 1):
            x = torch.randn(32, WIDTH, generator=g)
            loss = model(x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            if mgr.should_save(step):
                info = mgr.save(step, {"model": model, "optim": optim, "step": step}).wait()
                assert info is not None
                print(f"step {step}: wrote {info.nbytes / 1e6:.2f} MB, references "
                      f"{info.bytes_referenced / 1e6:.2f} MB of step(s) {list(info.depends_on)}")
    resumed, optim2 = build(seed=3)
    state = {"model": resumed, "optim": optim2, "step": 0}
    with shardckpt.CheckpointManager(root) as mgr:
        last = mgr.load(state)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  resumed.state_dict().values()))
    print(f"resumed from step {last}: weights {'identical' if same else 'DIFFER'}")
    return 0 if same and state["step"] == last else 1


if __name__ == "__main__":
    sys.exit(main())
