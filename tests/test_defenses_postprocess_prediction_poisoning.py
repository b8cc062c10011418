"""LastLayerMAD (issue 26; our last-layer variant of MAD, Orekondy et al. 2020): the top-1 label is kept, the L1
change stays within the budget, and the attacker's last-layer gradient turns farther than under any other vertex."""
from __future__ import annotations

import pytest
import torch

from safedl.defenses.postprocess.prediction_poisoning import LastLayerMAD, blend_keeping_argmax
from safedl.errors import ConfigError
from safedl.models import build_model


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_poisoned_answers_keep_the_label_respect_the_budget_and_turn_the_gradient_most(tiny_model, digits_splits):
    x = digits_splits.test.x[:128]
    torch.manual_seed(3)
    sur = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8)
    with torch.no_grad():
        y = tiny_model(x).softmax(1)
        p = sur.eval()(x).softmax(1)
    mad = LastLayerMAD(surrogate=sur, epsilon=1.0)
    out = mad(x, y)
    assert torch.equal(out.argmax(1), y.argmax(1))
    assert torch.allclose(out.sum(1), torch.ones(len(x)), atol=1e-5) and bool((out >= 0).all())
    assert float((out - y).abs().sum(1).max()) <= 1.0 + 1e-5
    assert float((out - y).abs().sum(1).mean()) > 0.2  # it does change the scores
    turned = _cos(out - p, y - p)
    for k in range(10):  # any single vertex blended under the same budget and rule turns the gradient less
        other = blend_keeping_argmax(y, torch.full((len(x),), k), epsilon=1.0)
        assert bool((turned <= _cos(other - p, y - p) + 1e-5).all())
    assert float(turned.mean()) < float(_cos(blend_keeping_argmax(y, y.argmax(1), epsilon=1.0) - p, y - p).mean())


def test_a_surrogate_without_a_linear_layer_or_a_bad_budget_is_refused():
    with pytest.raises(ConfigError, match="nn.Linear"):
        LastLayerMAD(surrogate=torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(ConfigError, match="epsilon"):
        LastLayerMAD(surrogate=torch.nn.Linear(3, 2), epsilon=3.0)
