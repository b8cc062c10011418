"""Gaussian noise on output probabilities (Chandrasekaran et al., "Exploring Connections Between Active Learning
and Model Extraction", USENIX Security 2020, noisy-output baseline)."""
from __future__ import annotations

import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("postprocessor", "gaussian_noise")
class GaussianNoise(Postprocessor):
    """Add N(0, scale^2) to the probabilities, clip at 0 and renormalise.

    With ``keep_label`` (default) the top-1 entry is restored when noise would change it, so clean accuracy is
    kept and only the scores are randomized; without it, noise can flip close decisions.
    """

    preserves_argmax = True

    def __init__(self, *, scale: float = 0.1, keep_label: bool = True, seed: int | None = 0):
        super().__init__()
        self.scale = float(check_positive(self, "scale", scale))
        self.keep_label = bool(keep_label)
        self.seed = seed
        self._gen: dict[str, torch.Generator] = {}

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(1)
        gen = None
        if self.seed is not None:
            key = str(p.device)
            if key not in self._gen:
                self._gen[key] = torch.Generator(device=p.device).manual_seed(int(self.seed))
            gen = self._gen[key]
        noisy = (p + self.scale * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)).clamp_min(0)
        if self.keep_label:
            top = p.argmax(1, keepdim=True)
            best_other = noisy.scatter(1, top, float("-inf")).max(1, keepdim=True).values
            noisy = noisy.scatter(1, top, torch.maximum(noisy.gather(1, top), best_other + 1e-6))
        return noisy / noisy.sum(1, keepdim=True).clamp_min(1e-12)
