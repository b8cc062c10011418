"""Local Intrinsic Dimensionality detector (Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic
Dimensionality", ICLR 2018)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from safedl import registry
from safedl.defenses.detect._base import Detector
from safedl.registry import register
from safedl.utils.validate import check_positive


def layer_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Flattened outputs of every ReLU layer and the logits (hooks keep them in the autograd graph)."""
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.flatten(1)))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return acts + [logits.flatten(1)]


def lid_mle(a: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum-likelihood LID of each row of ``a`` from its k nearest neighbours in ``ref`` (Amsaleg et al. 2015):
    -(1/k sum_i log(r_i / r_k))^-1."""
    d = torch.cdist(a, ref).clamp_min(1e-12)
    r = d.topk(k, dim=1, largest=False).values  # ascending
    return -1.0 / (torch.log(r / r[:, -1:]).mean(1) - 1e-12)


@register("detector", "lid")
class LIDDetector(Detector):
    """LID of the input's activations at every ReLU layer and the logits, estimated from its ``k`` nearest
    neighbours in a minibatch of ``reference_size`` clean images; a logistic regression on these LID features
    separates adversarial examples (positives: the registry's PGD at ``eps``) from clean and noisy ones (negatives:
    clean images and clean images with uniform noise of the same L-inf size), as in the paper.
    The score is the regression's logit, differentiable, so adaptive attacks can descend it.
    """

    def __init__(self, *, k: int = 20, reference_size: int = 100, eps: float = 0.3, attack_steps: int = 10,
                 fpr: float = 0.05, calibration_fraction: float = 0.3, batch_size: int = 500, max_fit: int = 1000):
        self.k = check_positive(self, "k", k, integer=True)
        self.reference_size = check_positive(self, "reference_size", reference_size, integer=True)
        if self.k >= self.reference_size:
            from safedl.errors import ConfigError

            raise ConfigError(f"lid: k={k} must be smaller than reference_size={reference_size}")
        self.eps = float(check_positive(self, "eps", eps))
        self.attack_steps = check_positive(self, "attack_steps", attack_steps, integer=True)
        self.max_fit = check_positive(self, "max_fit", max_fit, integer=True)
        self._init_common(fpr, calibration_fraction, batch_size)

    def lid_features(self, x: torch.Tensor) -> torch.Tensor:
        acts = layer_activations(self.model_, x)
        return torch.stack([lid_mle(a, r, self.k) for a, r in zip(acts, self.reference_acts_)], 1)

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        from sklearn.linear_model import LogisticRegression

        from safedl.utils.tensors import predict

        self.model_ = model
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(x), generator=g)
        ref, rest = x[perm[: self.reference_size]], x[perm[self.reference_size :]][: self.max_fit]
        if len(rest) < 2:
            raise ValueError(f"lid: needs more than reference_size={self.reference_size} clean images to fit")
        with torch.no_grad():
            self.reference_acts_ = [a.detach() for a in layer_activations(model, ref)]
        labels = predict(model, rest) if y is None else y[perm[self.reference_size :]][: self.max_fit]
        attack = registry.create("evasion", "pgd", eps=self.eps, steps=self.attack_steps, seed=seed)
        x_adv = torch.cat([attack(model, rest[i : i + self.batch_size], labels[i : i + self.batch_size])
                           for i in range(0, len(rest), self.batch_size)])
        noise = (torch.rand(rest.shape, generator=g) * 2 - 1).to(rest.device) * self.eps
        x_noisy = (rest + noise).clamp(0, 1)
        with torch.no_grad():
            feats = [torch.cat([self.lid_features(v[i : i + self.batch_size]) for i in range(0, len(v), self.batch_size)])
                     for v in (rest, x_noisy, x_adv)]
        f = torch.cat(feats).cpu().double()
        target = np.r_[np.zeros(2 * len(rest)), np.ones(len(rest))]
        self.feat_mean_ = f.mean(0).float()
        self.feat_std_ = f.std(0).clamp_min(1e-8).float()
        z = ((f.float() - self.feat_mean_) / self.feat_std_).numpy()
        lr = LogisticRegression(max_iter=1000, class_weight="balanced").fit(z, target)
        self.coef_ = torch.tensor(lr.coef_[0], dtype=torch.float32)
        self.intercept_ = float(lr.intercept_[0])

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        z = (self.lid_features(x) - self.feat_mean_.to(dev)) / self.feat_std_.to(dev)
        return z @ self.coef_.to(dev) + self.intercept_
