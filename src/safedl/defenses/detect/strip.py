"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019).

A trojaned input keeps its target prediction whatever it is blended with, because the trigger dominates; a clean
input's prediction scatters. Each input is superimposed (``blend="add"``: saturating pixel sum, as in the
authors' code, which keeps a bright trigger intact; ``"average"``: (1 - alpha) x + alpha overlay) with
``n_overlays`` images drawn from a clean holdout, and the mean Shannon entropy of the predictions is measured; low
entropy = trojaned. The score is the negated entropy (higher = more suspicious, as for every detector), and the
threshold is set on held-out clean images so that the false-rejection rate on clean data is ``fpr`` (the paper fixes
the FRR in advance). ``fit(x_clean, *, model)`` keeps the fit part of ``x_clean`` as the overlay pool.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safedl.defenses.detect._base import Detector
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_choice, check_fraction, check_range


@register("detector", "strip")
class STRIP(Detector):
    """Entropy of predictions under superimposition with clean images; threshold at a target false-rejection rate."""

    def __init__(self, *, n_overlays: int = 20, blend: str = "add", alpha: float = 0.5, fpr: float = 0.01,
                 calibration_fraction: float = 0.5, batch_size: int = 128, seed: int = 0):
        self.n_overlays = check_range(self, "n_overlays", n_overlays, low=1, high=1000, integer=True)
        self.blend = check_choice(self, "blend", blend, ("add", "average"))
        self.alpha = float(check_fraction(self, "alpha", alpha, allow_zero=False, allow_one=False))
        self.seed = check_range(self, "seed", seed, low=0, integer=True)
        self._init_common(fpr, calibration_fraction, batch_size)

    def _fit(self, x: torch.Tensor, model: nn.Module, *, y: torch.Tensor | None, seed: int, **kwargs: Any) -> None:
        if len(x) < 1:
            raise ConfigError("strip: fit needs clean images for the overlay pool")
        self.pool_ = x.detach().cpu()

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        # a fixed seed per call: the same inputs always meet the same overlays (reproducible scores)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randint(0, len(self.pool_), (len(x), self.n_overlays), generator=g)
        ov = self.pool_[idx].to(x.device)  # N x K x C x H x W
        if self.blend == "add":
            blend = (x[:, None] + ov).clamp(0.0, 1.0)
        else:
            blend = (1 - self.alpha) * x[:, None] + self.alpha * ov
        p = self.model_(blend.flatten(0, 1)).softmax(1).clamp_min(1e-12)
        entropy = -(p * p.log()).sum(1).view(len(x), self.n_overlays).mean(1)
        return -entropy
