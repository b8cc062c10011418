"""Gaussian noise added to every input at inference time (a randomized input transformation; the registry name
``gaussian_augmentation`` is historical).

This is not Gaussian data augmentation (Zantedeschi, Nicolae & Rawat, "Efficient Defenses Against Adversarial
Attacks", AISec 2017), which adds the noise to training images: that is a training recipe, not a preprocessor.
Noise at inference is the input side of random self-ensembles (Liu et al., "Towards Robust Neural Networks via
Random Self-ensemble", ECCV 2018) and, with many draws and a vote, of randomized smoothing (Cohen et al. 2019, see
``certify/randomized_smoothing.py``); alone, its robustness must be measured with EOT (it is randomized)."""
from __future__ import annotations

import torch

from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("preprocessor", "gaussian_augmentation")
class GaussianAugmentation(Preprocessor):
    """Inference-time input noise: add N(0, sigma^2) to every pixel, clip to [0, 1]; randomized (adaptive attacks use EOT)."""

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
