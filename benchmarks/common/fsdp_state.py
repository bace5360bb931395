"""A training state of a chosen size: an FSDP2 stack of Linear layers plus AdamW state.

Call under an initialized process group (``fully_shard`` shards over all ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard


def build(size_gb: float, width: int | None, device: torch.device,
          ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A model, its optimizer after one real AdamW step, and the shape chosen.

    ``size_gb`` (1 GB = 1e9 B) is the total fp32 state over all ranks: parameters plus
    ``exp_avg`` and ``exp_avg_sq``, i.e. 12 bytes per parameter. The layers are
    ``nn.Linear(width, width)``, each ``fully_shard``-ed, and the root too; ``width`` defaults to
    4096 from 0.8 GB of state, else 2048 from 0.1 GB, else 1024. Seeded, so every run builds the
    same values. The shape dict has ``width``, ``layers`` and ``params`` (global parameters).
    """
    target = size_gb * 1e9
    if width is None:
        width = 4096 if target >= 4 * 12 * 4096 * 4097 else 2048 if target >= 2 * 12 * 2048 * 2049 \
            else 1024
    layers = max(1, round(target / (12 * (width * width + width))))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, width, device=device)
    model(x).float().pow(2).mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim, {"width": width, "layers": layers,
                          "params": layers * (width * width + width)}


def local_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """This rank's tensors of the state (local shards of DTensors), in a stable order.

    Names are ``model.<param>`` and ``optim.<param>.<state key>``; the tensors are views of the
    live state, so writing into them changes the model and the optimizer.
    """
    out: list[tuple[str, torch.Tensor]] = []
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out.append((f"model.{n}", _local(p.detach())))
    for group in optim.param_groups:
        for p in group["params"]:
            for k, v in sorted(optim.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    out.append((f"optim.{names[id(p)]}.{k}", _local(v)))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> list[float]:
    """One float per tensor that changes when its values do (sum plus a scaled sum of |x|)."""
    return [float(t.detach().double().sum()) + float(t.detach().double().abs().sum()) * 1e-3
            for _, t in tensors]


def same_fingerprint(got: list[float], want: list[float]) -> bool:
    """Whether two fingerprints agree (to a relative 1e-9, for float summation order)."""
    return len(got) == len(want) and all(
        a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(got, want))


def zero_(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    """Set every local tensor of the state to zero (before a load that must fill it)."""
    with torch.no_grad():
        for _, t in local_tensors(model, optim):
            t.zero_()
