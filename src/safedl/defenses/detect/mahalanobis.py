"""Mahalanobis-distance detector (Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018)."""
from __future__ import annotations

import torch
from torch import nn

from safedl.defenses.detect._base import SupervisedDetector, layer_outputs
from safedl.models.features import features
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params, predict
from safedl.utils.validate import check_positive


def _features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every ReLU layer's output, spatially averaged per channel (the paper's feature ensemble); the penultimate
    features alone for a model without ReLU modules."""
    feats = layer_outputs(model, x, pool=True)[:-1]
    return feats if feats else [features(model, x)]


@register("detector", "mahalanobis")
class MahalanobisDetector(SupervisedDetector):
    """Per layer, class-conditional Gaussians with one tied covariance, fitted on clean images with their labels;
    the layer's characteristic is the Mahalanobis distance to the closest class mean. ``noise_magnitude`` > 0 is
    the paper's input preprocessing: per layer the input first moves by that L-inf step in the direction that
    brings it closer to its closest class. A logistic regression over the layers' distances (the feature ensemble)
    is trained on clean and noisy images against adversarial examples of ``attack`` at ``eps`` made at fit time,
    as in the paper's adversarial-detection setting (which fits and tests on the same attack).

    Half of the fit images (up to ``max_fit``) estimate the Gaussians, the other half train the regression, so
    the regression sees clean distances of images the Gaussians were not fitted on.
    """

    model_needs: tuple[str, ...] = ("hooks",)  # what the model must offer (safedl.models.features.model_problems)

    def __init__(self, *, noise_magnitude: float = 0.0, attack: str = "pgd", eps: float = 0.3,
                 attack_params: dict | None = None, fpr: float = 0.05, calibration_fraction: float = 0.3,
                 batch_size: int = 500, max_fit: int = 1000):
        self.noise_magnitude = float(check_positive(self, "noise_magnitude", noise_magnitude, allow_zero=True))
        self._init_attack(attack, eps, attack_params, max_fit)
        self._init_common(fpr, calibration_fraction, batch_size)

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        self.model_ = model
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(x), generator=g)
        half = len(x) // 2
        gauss_idx, reg_idx = perm[:half], perm[half:][: self.max_fit]
        if half < 2 or len(reg_idx) < 2:
            raise ValueError("mahalanobis: needs at least 4 clean images to fit")
        labels = predict(model, x) if y is None else y
        with torch.no_grad(), eval_mode(model), frozen_params(model):
            xg = x[gauss_idx]
            per_batch = [_features(model, xg[i : i + self.batch_size]) for i in range(0, len(xg), self.batch_size)]
        lab = labels[gauss_idx].to(per_batch[0][0].device)
        k = int(labels.max()) + 1
        self.means_, self.precisions_ = [], []
        for layer in range(len(per_batch[0])):
            f = torch.cat([b[layer] for b in per_batch]).double()
            means = torch.stack([f[lab == c].mean(0) if bool((lab == c).any()) else f.mean(0) for c in range(k)])
            centred = f - means[lab]
            cov = centred.T @ centred / len(f)
            self.means_.append(means.float())
            self.precisions_.append(torch.linalg.pinv(cov, hermitian=True).float())
        self._fit_regression(x[reg_idx], labels[reg_idx], model, seed)

    def _layer_distance(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        """The Mahalanobis distance (N) of one layer's features to the closest class mean."""
        d = f.unsqueeze(1) - self.means_[layer].to(f.device).unsqueeze(0)  # N x K x D
        return torch.einsum("nkd,de,nke->nk", d, self.precisions_[layer].to(f.device), d).min(1).values

    def _closest(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the Mahalanobis distance (N) to the closest class mean."""
        return [self._layer_distance(layer, f) for layer, f in enumerate(feats)]

    def _characteristics(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_magnitude <= 0:
            return torch.stack(self._closest(_features(self.model_, x)), 1)
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            dists = self._closest(_features(self.model_, xi))
            grads = [torch.autograd.grad(d.sum(), xi, retain_graph=i < len(dists) - 1)[0] for i, d in enumerate(dists)]
        out = []
        for layer, g in enumerate(grads):
            # the step is a fixed function of x for an attacker (BPDA: the identity's gradient through it)
            step = (x.detach() - self.noise_magnitude * g.sign()).clamp(0, 1) - x.detach()
            out.append(self._layer_distance(layer, _features(self.model_, x + step)[layer]))
        return torch.stack(out, 1)
