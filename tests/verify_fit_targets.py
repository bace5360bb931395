"""Model factories for tests/test_verify_record.py: one that fits a saved ``nn.Linear(4, 4)``,
ones that do not (other shape, an extra key), and one that fits but computes otherwise."""

from __future__ import annotations

import torch
import torch.nn as nn


class Shifted(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class WithExtra(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 4)
        self.scale = nn.Parameter(torch.ones(4))


def build_fit() -> nn.Module:
    torch.manual_seed(99)
    return nn.Linear(4, 4)


def build_wider() -> nn.Module:
    return nn.Linear(4, 5)


def build_extra() -> nn.Module:
    return WithExtra()


def build_shifted() -> nn.Module:
    return Shifted(4, 4)
