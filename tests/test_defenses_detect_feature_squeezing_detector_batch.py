"""The feature-squeezing detector scores with one forward pass per batch (raw, bit-depth and median inputs
concatenated) and gives the same scores and gradients as the three separate passes of Xu et al. (NDSS 2018)."""
from __future__ import annotations

import torch
from torch import nn

from safedl.defenses.detect.feature_squeezing_detector import FeatureSqueezingDetector
from safedl.defenses.preprocess.feature_squeezing import FeatureSqueezing
from safedl.defenses.preprocess.spatial_smoothing import median_filter


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


def _reference(model: nn.Module, x: torch.Tensor, *, bit_depth: int, window: int) -> torch.Tensor:
    """The paper's score, three forward passes."""
    p = model(x).softmax(1)
    p_bits = model(FeatureSqueezing(bit_depth=bit_depth)(x)).softmax(1)
    p_med = model(median_filter(x, window)).softmax(1)
    return torch.maximum((p - p_bits).abs().sum(1), (p - p_med).abs().sum(1))


def _fitted(model: nn.Module) -> FeatureSqueezingDetector:
    det = FeatureSqueezingDetector(bit_depth=2, window=2, fpr=0.1)
    return det.fit(torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), model=model, seed=0)


def test_one_forward_pass_per_batch_same_scores():
    model = _model()
    det = _fitted(model)
    calls: list[int] = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    scores = det.score(x)
    assert calls == [21]  # one pass of 3 x 7 inputs (the old code made three passes of 7)
    with torch.no_grad():
        ref = _reference(model, x, bit_depth=2, window=2)
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6)


def test_gradients_match_the_three_pass_score_with_bpda():
    model = _model()
    det = _fitted(model)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x1 = x.clone().requires_grad_(True)
    det.score_torch(x1).sum().backward()
    x2 = x.clone().requires_grad_(True)
    p = model(x2).softmax(1)
    p_bits = model(x2 + (FeatureSqueezing(bit_depth=2)(x2) - x2).detach()).softmax(1)  # BPDA: identity gradient
    p_med = model(median_filter(x2, 2)).softmax(1)
    torch.maximum((p - p_bits).abs().sum(1), (p - p_med).abs().sum(1)).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
