"""Feature-squeezing detector (Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018)."""
from __future__ import annotations

import torch

from safedl.defenses.adaptive import bpda
from safedl.defenses.detect._base import Detector
from safedl.defenses.preprocess.feature_squeezing import FeatureSqueezing
from safedl.defenses.preprocess.spatial_smoothing import median_filter
from safedl.registry import register
from safedl.utils.validate import check_range


@register("detector", "feature_squeezing_detector")
class FeatureSqueezingDetector(Detector):
    """Score = max over squeezers of the L1 distance between the softmax on the raw input and on the squeezed one.

    Squeezers: bit-depth reduction to ``bit_depth`` bits and a ``window`` x ``window`` median filter (the paper's
    MNIST setting is 1 bit and 2x2). Bit-depth reduction is differentiated with BPDA (identity) in ``score_torch``.
    """

    def __init__(self, *, bit_depth: int = 1, window: int = 2, fpr: float = 0.05, calibration_fraction: float = 0.3,
                 batch_size: int = 500):
        self.bit_depth = check_range(self, "bit_depth", bit_depth, low=1, high=8, integer=True)
        self.window = check_range(self, "window", window, low=1, high=11, integer=True)
        self._init_common(fpr, calibration_fraction, batch_size)

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        """Nothing to learn: the squeezers are fixed and the threshold comes from clean calibration images."""

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The raw, bit-depth-reduced and median-filtered inputs go through the model as one batch of 3N (one
        forward pass instead of three: the same softmaxes for a model in eval mode, at about half the CPU cost for
        a single image; gradients flow as before)."""
        n = x.shape[0]
        squeezed = (bpda(FeatureSqueezing(bit_depth=self.bit_depth), None, x), median_filter(x, self.window))
        logits = self.model_(torch.cat((x, *squeezed)))
        return self.score_from_logits(logits[:n], logits[n:])

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The two squeezed versions of x (2N: bit depth, then median), for a pipeline that runs them through the
        classifier's forward pass together with x (deploy/shared_forward.py)."""
        return torch.cat((FeatureSqueezing(bit_depth=self.bit_depth)(x), median_filter(x, self.window)))

    def score_from_logits(self, logits: torch.Tensor, derived_logits: torch.Tensor) -> torch.Tensor:
        """The paper's score from the model's logits on x (N x K) and on its two squeezed versions (2N x K)."""
        p = logits.softmax(1)
        p_bits, p_med = derived_logits.softmax(1).split(len(logits))
        return torch.maximum((p - p_bits).abs().sum(1), (p - p_med).abs().sum(1))
