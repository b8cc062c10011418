"""Spatial smoothing with a median filter (Xu, Evans, Qi, NDSS 2018, "Feature Squeezing")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_range


def median_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Per-channel median over a ``window`` x ``window`` neighbourhood, reflect-padded, batched with unfold."""
    if window == 1:
        return x
    n, c, h, w = x.shape
    # an even window is centred like scipy's median_filter: one more pixel before than after
    before, after = window // 2, (window - 1) // 2
    mode = "reflect" if min(h, w) > window else "replicate"
    padded = F.pad(x, (before, after, before, after), mode=mode)
    patches = F.unfold(padded.reshape(n * c, 1, *padded.shape[-2:]), kernel_size=window)  # (N*C) x w^2 x (H*W)
    return patches.median(dim=1).values.reshape(n, c, h, w)


@register("preprocessor", "spatial_smoothing")
class SpatialSmoothing(Preprocessor):
    """Median filter with a square ``window``.

    The median selects one input pixel per output pixel, so autograd gives the exact (sparse) gradient of this
    piecewise-linear map; adaptive attacks differentiate through it directly.
    """

    differentiable = True

    def __init__(self, *, window: int = 2):
        super().__init__()
        self.window = check_range(self, "window", window, low=1, high=11, integer=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median_filter(x, self.window)
