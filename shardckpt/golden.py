"""Golden batches: inputs and the outputs the model gave for them at save time.

Stored inside the checkpoint under the reserved key :data:`GOLDEN_KEY` (inputs and outputs as
ordinary tensors of the state) with their spec in the manifest's ``golden`` entry, so that the
verifier can rebuild the model from the checkpoint, replay the inputs and compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

GOLDEN_KEY = "__shardckpt_golden__"


@dataclass(frozen=True)
class Golden:
    """Canonical input batches for ``state[module]``; outputs are recorded at save time.

    Each input is a tensor (called as ``module(x)``), a tuple/list (``module(*x)``) or a dict
    (``module(**x)``) of tensors. Outputs are compared bitwise when both tolerances are 0.
    """

    inputs: Sequence[Any]
    module: str = "model"
    atol: float = 0.0
    rtol: float = 0.0
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, (list, tuple)) or not self.inputs:
            raise ValueError("Golden.inputs must be a non-empty list of batches")
        for tol in (self.atol, self.rtol):
            if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
                raise ValueError(f"Golden tolerances must be finite and >= 0, got {tol!r}")

    def spec(self) -> dict[str, Any]:
        return {"module": self.module, "atol": float(self.atol), "rtol": float(self.rtol),
                "batches": len(self.inputs), "name": self.name}


def call(module: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (list, tuple)):
        return module(*batch)
    return module(batch)


def detach(value: Any) -> Any:
    """A copy of an output structure with tensors detached, full (DTensor) and on the CPU."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach(v) for v in value) if isinstance(value, list) else \
            tuple(detach(v) for v in value)
    return value


def record(golden: Golden, state: Mapping[str, Any]) -> dict[str, Any]:
    """Run every golden batch through ``state[golden.module]`` (eval, no grad; train mode
    restored after) and return what to store under :data:`GOLDEN_KEY`. Collective for FSDP
    models: every rank calls it with the same inputs."""
    module = state.get(golden.module)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"Golden.module={golden.module!r} does not name an nn.Module in the state")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = [detach(call(module, b)) for b in golden.inputs]
    finally:
        module.train(was_training)
    return {"inputs": [detach(b) for b in golden.inputs], "outputs": outputs}
