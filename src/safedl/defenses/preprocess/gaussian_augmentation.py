"""Gaussian noise on the input at inference (Zantedeschi, Nicolae, Rawat, "Efficient Defenses Against Adversarial
Attacks", AISec 2017); with a noise-trained model it is also the base of randomized smoothing."""
from __future__ import annotations

import torch

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("preprocessor", "gaussian_augmentation")
class GaussianAugmentation(Preprocessor):
    """Add N(0, sigma^2) noise to every pixel and (with ``clip``) clip to [0, 1]; randomized, so adaptive attacks use EOT."""

    differentiable = True
    randomized = True

    def __init__(self, *, sigma: float = 0.1, clip: bool = True, seed: int | None = 0):
        super().__init__()
        self.sigma = float(check_positive(self, "sigma", sigma))
        self.clip = bool(clip)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self._generator(x.device), device=x.device, dtype=x.dtype)
        out = x + self.sigma * noise
        # clip=False keeps the unclipped noise randomized smoothing certifies against
        return out.clamp(0, 1) if self.clip else out
