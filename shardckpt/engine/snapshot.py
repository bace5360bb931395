"""Copy a rank's tensor leaves so training may change its tensors as soon as ``save`` returns."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..planning.statedict import Collected


def snapshot(collected: Collected) -> Collected:
    """A copy of every leaf's data on the CPU, contiguous; aliases keep sharing the copy."""
    copies: dict[str, torch.Tensor] = {}
    leaves = []
    for leaf in collected.leaves:
        if leaf.alias_of is not None and leaf.alias_of in copies:
            data = copies[leaf.alias_of]
        else:
            src = leaf.data
            data = torch.empty(src.shape, dtype=src.dtype, device="cpu")
            data.copy_(src)
            copies[leaf.key] = data
        leaves.append(replace(leaf, data=data))
    return Collected(collected.tree, leaves)
