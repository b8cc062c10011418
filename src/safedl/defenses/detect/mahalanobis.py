"""Mahalanobis-distance detector (Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018)."""
from __future__ import annotations

import torch
from torch import nn

from safedl.defenses.detect._base import Detector, penultimate
from safedl.registry import register
from safedl.utils.tensors import predict
from safedl.utils.validate import check_positive


@register("detector", "mahalanobis")
class MahalanobisDetector(Detector):
    """Class-conditional Gaussians with one tied covariance on the penultimate features; the score is the smallest
    Mahalanobis distance to a class mean.

    ``noise_magnitude`` > 0 enables the paper's input preprocessing: the input moves by that L-inf step in the
    direction that brings it closer to its nearest class, which separates clean from adversarial inputs further.
    """

    def __init__(self, *, noise_magnitude: float = 0.0, fpr: float = 0.05, calibration_fraction: float = 0.3,
                 batch_size: int = 500):
        self.noise_magnitude = float(check_positive(self, "noise_magnitude", noise_magnitude, allow_zero=True))
        self._init_common(fpr, calibration_fraction, batch_size)

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        labels = predict(model, x) if y is None else y
        with torch.no_grad():
            feats = torch.cat([penultimate(model, x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        labels = labels.to(feats.device)
        k = int(labels.max()) + 1
        means = torch.stack([feats[labels == c].mean(0) if bool((labels == c).any()) else feats.mean(0) for c in range(k)])
        centred = feats - means[labels]
        cov = centred.T @ centred / len(feats)
        self.means_ = means
        self.precision_ = torch.linalg.pinv(cov.double()).float()

    def _distances(self, x: torch.Tensor) -> torch.Tensor:
        f = penultimate(self.model_, x)
        d = f.unsqueeze(1) - self.means_.unsqueeze(0)  # N x K x D
        return torch.einsum("nkd,de,nke->nk", d, self.precision_, d)

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_magnitude > 0:
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._distances(xi).min(1).values.sum(), xi)
            # the step is a fixed function of x for the attacker (BPDA: gradient of the identity through it)
            x = x + (x.detach() - self.noise_magnitude * g.sign()).clamp(0, 1) - x.detach()
        return self._distances(x).min(1).values
