"""Normalization as the model's first layer, so attacks always work in [0, 1] pixel space."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def with_normalization(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``nn.Sequential(Normalize(mean, std), net)``: the model every stage attacks and defends."""
    return nn.Sequential(Normalize(mean, std), net)


def unwrap(model: nn.Module) -> nn.Module:
    """The network behind a Normalize wrapper (for feature extraction)."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        return model[1]
    return model
