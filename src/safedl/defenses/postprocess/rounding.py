"""Rounding of output probabilities (Tramer et al., "Stealing Machine Learning Models via Prediction APIs",
USENIX Security 2016, section 8)."""
from __future__ import annotations

import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.registry import register
from safedl.utils.validate import check_range


@register("postprocessor", "rounding")
class Rounding(Postprocessor):
    """Round the softmax probabilities to ``decimals`` decimal places (ties can hide the order of close classes,
    so the argmax is kept by ranking the rounded scores with a tiny bonus for the true top-1)."""

    def __init__(self, *, decimals: int = 2):
        super().__init__()
        self.decimals = check_range(self, "decimals", decimals, low=0, high=8, integer=True)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(1)
        scale = 10.0**self.decimals
        out = torch.round(p * scale) / scale
        # keep the label: the model's top-1 gets a bonus below the rounding resolution
        top = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
        return out + top * (0.1 / scale)
