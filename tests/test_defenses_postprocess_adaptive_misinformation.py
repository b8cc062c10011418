"""Issue 26: adaptive misinformation hurts copies made from out-of-distribution queries at a small benign cost; the
DAWN response watermark is deterministic, keyed and rare, and its verification's p-value behaves."""
from __future__ import annotations

import pytest
import torch

from safedl.defenses.ownership import ResponseWatermark, WatermarkedModel, verify_ownership
from safedl.defenses.postprocess.adaptive_misinformation import AdaptiveMisinformation, misinformed
from safedl.errors import ConfigError, UserError
from safedl.evaluate.attack_extraction import attacker_pool


def _probs(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


def test_misinformation_keeps_confident_answers_and_reverses_unsure_ones():
    p = torch.tensor([[0.97, 0.02, 0.01], [0.4, 0.35, 0.25]])
    out = misinformed(p, tau=0.6, nu=1000.0)
    assert torch.allclose(out[0], p[0], atol=1e-6)
    assert int(out[1].argmax()) == 2 and torch.allclose(out.sum(1), torch.ones(2))
    with pytest.raises(ConfigError, match="calibrate"):
        AdaptiveMisinformation().calibrate(torch.zeros(3), max_flip=0.01)


def test_adaptive_misinformation_changes_ood_answers_far_more_often_than_benign_ones(tiny_model, digits_splits):
    """The mechanism, not a copy's fidelity (that is measured, on two seeds, by bench/measure_model_stealing.py):
    with tau at the 0.5% confidence quantile of training images, few benign answers change and many more answers
    to out-of-distribution queries do."""
    am = AdaptiveMisinformation().calibrate(_probs(tiny_model, digits_splits.train.x), max_flip=0.005)
    tx, ty = digits_splits.test.x, digits_splits.test.y
    pool = attacker_pool(digits_splits, "mnist5k")[:1000]
    with torch.no_grad():
        clean, defended = tiny_model(tx).argmax(1), am(tiny_model(tx)).argmax(1)
        changed_ood = float((am(tiny_model(pool)).argmax(1) != tiny_model(pool).argmax(1)).float().mean())
    changed_benign = float((clean != defended).float().mean())
    assert changed_benign <= 0.02  # n = 360 test images
    assert float((clean == ty).float().mean() - (defended == ty).float().mean()) <= 0.02
    assert changed_ood > 3 * max(changed_benign, 1 / len(tx)), (changed_ood, changed_benign)


def test_watermark_is_keyed_deterministic_rare_and_always_a_wrong_label(tiny_model, digits_splits):
    x = torch.cat([digits_splits.train.x, digits_splits.test.x])
    wm = ResponseWatermark(key=b"s" * 32, num_classes=10, rate=0.05)
    labels = _probs(tiny_model, x).argmax(1)
    mask, wl = wm.select(x, labels)
    assert torch.equal(mask, wm.select(x.clone(), labels)[0])  # the same image, the same choice
    other, _ = ResponseWatermark(key=b"t" * 32, num_classes=10, rate=0.05).select(x, labels)
    assert not torch.equal(mask, other)
    n = len(x)
    assert abs(float(mask.float().mean()) - 0.05) < 3 * (0.05 * 0.95 / n) ** 0.5 + 1e-9
    assert bool((wl[mask] != labels[mask]).all()) and bool((wl[~mask] == -1).all())
    out = WatermarkedModel(tiny_model, wm)(x).argmax(1)
    assert torch.equal(out[mask], wl[mask]) and torch.equal(out[~mask], labels[~mask])
    with pytest.raises(ConfigError, match="16 bytes"):
        ResponseWatermark(key=b"short", num_classes=10)


def test_verification_p_value_separates_a_memorising_copy_from_an_independent_model(tiny_model, digits_splits):
    x = digits_splits.train.x
    wm = ResponseWatermark(key=b"s" * 32, num_classes=10, rate=0.05)
    victim = _probs(tiny_model, x).argmax(1)
    copy_labels = WatermarkedModel(tiny_model, wm)(x).argmax(1)  # a copy that learned every answer
    v = verify_ownership(watermark=wm, evidence=x, victim_labels=victim, suspect_labels=copy_labels)
    assert v.copy and v.matches == v.n and v.p_value < 1e-10
    indep = verify_ownership(watermark=wm, evidence=x, victim_labels=victim, suspect_labels=victim)
    assert not indep.copy and indep.matches == 0 and indep.p_value == 1.0
    with pytest.raises(UserError, match="none of the"):
        verify_ownership(watermark=wm, evidence=x[:0], victim_labels=victim[:0], suspect_labels=victim[:0])
