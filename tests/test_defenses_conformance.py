"""Conformance of every registered preprocessor and detector on 1-channel and 3-channel inputs: preprocessors keep
shape, dtype and the [0, 1] range and treat every channel; detectors fit, score one value per image and flag about
their target FPR of clean images."""
from __future__ import annotations

import math

import pytest
import torch

from safedl import registry
from conftest import to_color

PREPROCESSORS = registry.names("preprocessor")
DETECTORS = registry.names("detector")


@pytest.mark.parametrize("name", PREPROCESSORS)
def test_preprocessor_contract(name, channels_case):
    channels, _, x, _, train = channels_case
    pre = registry.create("preprocessor", name)
    if getattr(pre, "needs_fit", False):  # a learned preprocessor (MagNet's reformer) fits on clean images first
        pre.fit(train.x[:200], seed=0)
    with torch.no_grad():
        out = pre(x[:32])
    assert out.shape == x[:32].shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    assert torch.isfinite(out).all()
    if channels == 3:  # every channel is processed, none is dropped or copied from another
        for c in range(3):
            assert not torch.equal(out[:, c], out[:, (c + 1) % 3])


@pytest.mark.parametrize("name", [n for n in PREPROCESSORS if not getattr(registry.get("preprocessor", n),
                                                                          "randomized", False)
                                  and not getattr(registry.get("preprocessor", n), "needs_fit", False)])
def test_preprocessor_gray_as_color_matches_gray(name, digits_splits):
    """A gray image given as 3 equal channels comes out as 3 equal channels close to the gray result."""
    x = digits_splits.test.x[:16]
    pre = registry.create("preprocessor", name)
    with torch.no_grad():
        gray, color = pre(x), pre(x.repeat(1, 3, 1, 1))
    assert (color - gray.repeat(1, 3, 1, 1)).abs().mean() < 0.02


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_contract(name, channels_case):
    _, model, x, y, train = channels_case
    extra = {"max_fit": 300} if name == "lid" else {}
    det = registry.create("detector", name, fpr=0.05, **extra).fit(train.x, model=model, y=train.y, seed=0)
    scores = det.score(x)
    assert scores.shape == (len(x),) and torch.isfinite(scores).all()
    flags = det.predict(x)
    assert flags.dtype == torch.bool and flags.shape == (len(x),)
    fpr = float(flags.float().mean())
    assert fpr < 0.05 + 4 * math.sqrt(0.05 * 0.95 / len(x)) + 0.02, fpr


def test_to_color_channels_differ(digits_splits):
    x3 = to_color(digits_splits.test.x[:4])
    assert x3.shape[1] == 3 and not torch.equal(x3[:, 0], x3[:, 1])
