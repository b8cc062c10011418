"""Superimposition entropy on the training set (STRIP run without a clean hold-out)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl.defenses.cleanse.superimposition import (other_label_overlays, superimposition_entropy,
                                                     superimposition_scores)
from safedl.errors import ConfigError


def test_overlays_come_from_other_labels_only():
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    idx = other_label_overlays(y, n_overlays=50, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (6, 50)
    assert bool((y[idx] != y[:, None]).all())
    assert set(idx[2].tolist()) == {0, 1, 3, 4, 5}  # every other-label sample is drawn


def test_one_class_is_refused():
    with pytest.raises(ConfigError, match="other labels"):
        other_label_overlays(torch.zeros(4, dtype=torch.long), n_overlays=2, generator=torch.Generator())


class _Trigger(nn.Module):
    """Predicts class 1 with certainty when the top-left pixel is lit, else a flat distribution."""

    def forward(self, x):
        lit = (x[:, 0, 0, 0] > 0.5).float()[:, None]
        return torch.cat([torch.zeros_like(lit), 20 * lit], 1)


def test_a_surviving_trigger_has_low_entropy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g) * 0.2  # no blend of two untriggered images lights the pixel (max or sum)
    y = torch.arange(40) % 2
    x[:5, 0, 0, 0] = 1.0  # five triggered samples
    ent = superimposition_entropy(_Trigger(), x, y, n_overlays=8, seed=0)
    assert ent.shape == (40,)
    assert float(ent[:5].max()) < 1e-3 < float(ent[5:].min())  # the trigger survives any blend (saturating sum)


@pytest.mark.parametrize("blend", ["max", "add"])
def test_a_surviving_trigger_keeps_its_label(blend):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g) * 0.2
    y = torch.arange(40) % 2
    x[:5, 0, 0, 0] = 1.0
    y[:5] = 1  # triggered samples carry the label the trigger forces
    out = superimposition_scores(_Trigger(), x, y, n_overlays=8, blend=blend, seed=0)
    assert out["persistence"][:5].tolist() == [1.0] * 5
    assert float(out["score"][:5].max()) < float(out["score"][5:].min())


def test_unknown_blend_is_refused():
    with pytest.raises(ConfigError, match="allowed 'max' or 'add'"):
        superimposition_scores(_Trigger(), torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), blend="mean")
