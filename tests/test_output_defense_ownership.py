"""Issue 26: adaptive misinformation hurts copies made from out-of-distribution queries at a small benign cost; the
DAWN response watermark is deterministic, keyed and rare, and its verification's p-value behaves."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.attacks.extraction.base import ExtractionOracle
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


def test_adaptive_misinformation_lowers_an_ood_copy_at_small_benign_cost(tiny_model, digits_splits):
    am = AdaptiveMisinformation().calibrate(_probs(tiny_model, digits_splits.train.x), max_flip=0.005)
    tx, ty = digits_splits.test.x, digits_splits.test.y
    with torch.no_grad():
        clean = (tiny_model(tx).argmax(1) == ty).float().mean()
        defended = (am(tiny_model(tx)).argmax(1) == ty).float().mean()
    assert clean - defended <= 0.02  # n = 360 test images: at most 7 answers changed
    pool = attacker_pool(digits_splits, "mnist5k")[:1000]
    fid = {}
    for name, post in (("plain", None), ("am", am)):
        attack = registry.create("extraction", "copycat", pool="mnist5k", epochs=10, seed=0)
        oracle = ExtractionOracle(tiny_model, budget=1000, output="scores", postprocess=post)
        copy = attack.extract(oracle, pool, num_classes=10).surrogate
        with torch.no_grad():
            fid[name] = float((copy(tx).argmax(1) == tiny_model(tx).argmax(1)).float().mean())
    assert fid["am"] < fid["plain"] - 0.05, fid


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
