"""Adaptive misinformation (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with Adaptive
Misinformation", CVPR 2020), with our own misinformation function (no second network)."""
from __future__ import annotations

import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.errors import ConfigError
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive

DEFAULT_NU = 1000.0  #: sharpness of the switch: misinformation within about 0.005 below tau


def misinformed(p: torch.Tensor, *, tau: float, nu: float) -> torch.Tensor:
    """y = (1 - a) p + a q with a = sigmoid(nu (tau - max p)) and q = softmax(-logits) = normalize(1 / p).

    Queries the model is confident on (in-distribution, max p well above ``tau``) keep their scores; low-confidence
    (out-of-distribution) queries get scores that put the most mass on the classes the model finds least likely.
    """
    p = p.clamp_min(1e-12)
    inv = 1.0 / p
    q = inv / inv.sum(1, keepdim=True)
    a = torch.sigmoid(nu * (tau - p.max(1, keepdim=True).values))
    return (1 - a) * p + a * q


@register("postprocessor", "adaptive_misinformation")
class AdaptiveMisinformation(Postprocessor):
    """The paper's mixing of the true scores with misinformation, switched by the maximum softmax probability
    (the paper's OOD test, Hendrycks & Gimpel 2017). The paper trains a misinformation network to minimise the
    probability of the correct class; this variant uses the model's own reversed logits, softmax(-z), instead.
    ``tau``: the confidence below which answers turn to misinformation; ``nu``: how sharply. ``calibrate(probs,
    max_flip=...)`` sets ``tau`` to the ``max_flip`` quantile of the confidences of benign in-distribution images
    (e.g. 0.005: at most about half a point of benign top-1 accuracy is spent).
    """

    preserves_argmax = False

    def __init__(self, *, tau: float = 0.5, nu: float = DEFAULT_NU):
        super().__init__()
        self.tau = float(check_fraction(self, "tau", tau))
        self.nu = float(check_positive(self, "nu", nu))

    def calibrate(self, probs: torch.Tensor, *, max_flip: float) -> "AdaptiveMisinformation":
        q = float(check_fraction(self, "max_flip", max_flip))
        if probs.ndim != 2 or len(probs) == 0:
            raise ConfigError(f"AdaptiveMisinformation: calibrate needs N x K probabilities, got {tuple(probs.shape)}")
        self.tau = float(torch.quantile(probs.max(1).values.double(), q))
        return self

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return misinformed(logits.softmax(1), tau=self.tau, nu=self.nu)
