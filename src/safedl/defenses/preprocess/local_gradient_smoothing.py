"""Local gradient smoothing, a patch defense (Naseer, Khan & Porikli, "Local Gradients Smoothing: Defense against
localized adversarial attacks", WACV 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive, check_range


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per image, the first-order gradient magnitude sqrt(dx^2 + dy^2) of the channel-mean image (forward
    differences, zero at the far border), scaled to [0, 1] by its maximum; N x 1 x H x W."""
    g = x.mean(1, keepdim=True)
    dx = F.pad(g[..., :, 1:] - g[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
    mag = (dx ** 2 + dy ** 2).sqrt()
    return mag / mag.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def active_windows(mag: torch.Tensor, *, window: int, stride: int, threshold: float) -> torch.Tensor:
    """N x 1 x H x W mask: True where a pixel lies in at least one ``window`` x ``window`` window (every ``stride``
    pixels) whose mean normalised gradient magnitude exceeds ``threshold``."""
    h, w = mag.shape[-2:]
    k = min(window, h, w)
    active = (F.avg_pool2d(mag, k, stride=stride) > threshold).to(mag.dtype)
    covered = F.conv_transpose2d(active, torch.ones(1, 1, k, k, dtype=mag.dtype, device=mag.device), stride=stride)
    covered = F.pad(covered, (0, w - covered.shape[-1], 0, h - covered.shape[-2]))
    return covered > 0


@register("preprocessor", "local_gradient_smoothing")
class LocalGradientSmoothing(Preprocessor):
    """Suppress high-frequency regions where a patch concentrates: the normalised gradient magnitude g is kept only
    in windows (``window`` x ``window``, every ``stride`` pixels) whose mean g exceeds ``threshold`` (the paper's
    tau = 0.1) and zeroed elsewhere; the image is multiplied by clip(1 - ``smoothing`` * g, 0, 1) (the paper's
    lambda = 2.3). A pixel keeps its g if any active window covers it (the paper's overlapping windows). The window
    threshold is a step function, so adaptive attacks use BPDA (identity backward) through it.
    """

    differentiable = False

    def __init__(self, *, window: int = 3, stride: int = 1, threshold: float = 0.1, smoothing: float = 2.3):
        super().__init__()
        self.window = check_range(self, "window", window, low=1, high=64, integer=True)
        self.stride = check_range(self, "stride", stride, low=1, high=64, integer=True)
        self.threshold = float(check_range(self, "threshold", threshold, low=0.0, high=1.0))
        self.smoothing = float(check_positive(self, "smoothing", smoothing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mag = gradient_magnitude(x)
        keep = active_windows(mag, window=self.window, stride=self.stride, threshold=self.threshold)
        return x * (1 - self.smoothing * mag * keep).clamp(0, 1)
