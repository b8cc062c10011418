"""Feature squeezing by colour bit-depth reduction (Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial
Examples in Deep Neural Networks", NDSS 2018)."""
from __future__ import annotations

import torch

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_range


@register("preprocessor", "feature_squeezing")
class FeatureSqueezing(Preprocessor):
    """Quantize every pixel to ``bit_depth`` bits: round(x * (2^b - 1)) / (2^b - 1).

    Rounding has zero gradient almost everywhere, so adaptive attacks go through it with BPDA (identity backward).
    """

    differentiable = False

    def __init__(self, *, bit_depth: int = 1):
        super().__init__()
        self.bit_depth = check_range(self, "bit_depth", bit_depth, low=1, high=8, integer=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bit_depth - 1
        return torch.round(x.clamp(0, 1) * levels) / levels
