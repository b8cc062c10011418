"""Per-key query detectors: stateful k-NN (Chen et al.), PRADA (Juuti et al.), query-volume anomaly."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.attacks.extraction.base import ExtractionOracle
from safedl.defenses.query import PRADA, ObservedModel, QueryDetector, QueryVerdict, StatefulDetector, VolumeAnomaly
from safedl.errors import ConfigError


@pytest.fixture(scope="module")
def stateful(digits_splits):
    return StatefulDetector(k=20, history=200).calibrate([digits_splits.train.x], fpr=1e-3)


def _benign(detector, x, key="benign"):
    om = ObservedModel(torch.nn.Identity(), {"d": detector}, key=key)
    for i in range(0, len(x), 10):
        om(x[i:i + 10])
    return om.first_detection_


def test_detectors_follow_the_protocol(stateful, digits_splits):
    """The protocol's behaviour, not just its method names: a verdict per batch, counted per key, flagged exactly
    when score > 1, and ``reset(key)`` forgets that key only."""
    x = digits_splits.test.x[:30]
    for d in (stateful, PRADA(), VolumeAnomaly()):
        assert isinstance(d, QueryDetector)
        d.reset()
        for i in range(0, 30, 10):
            v = d.observe("a", x[i:i + 10])
            assert isinstance(v, QueryVerdict) and v.n_seen == i + 10, type(d).__name__
            assert v.flagged == (v.score > 1) and (v.first_at is None) == (not v.flagged)
            assert 0 <= v.n_flagged <= 10 and (v.n_flagged > 0) == v.flagged
        assert d.observe("b", x[:10]).n_seen == 10  # another key starts from zero
        d.reset("a")
        assert d.observe("a", x[:5]).n_seen == 5 and d.observe("b", x[:5]).n_seen == 15
        d.reset()


def test_knn_scores_match_a_slow_reference(digits_splits):
    det = StatefulDetector(k=3, history=6, threshold=1e9)
    x = digits_splits.test.x[:14]
    flat = x.flatten(1)
    seen = []
    for i in range(0, 14, 5):  # batches of 5, 5, 4
        v = det.observe("k", x[i:i + 5])
        expected = []
        for j in range(i, min(i + 5, 14)):
            window = (flat[max(0, i - 6):i] if i else flat[:0])  # the stored history before the batch ...
            window = torch.cat([window, flat[i:j]])                 # ... plus the batch's earlier queries
            if len(window) >= 3:
                expected.append(float((flat[j] - window).norm(dim=1).sort().values[:3].mean()))
        seen.append((v, expected))
    for v, expected in seen:
        if expected:
            assert v.score == pytest.approx(1e9 / min(expected), rel=1e-4)
        else:
            assert v.score == 0.0 and not v.flagged
    assert seen[-1][0].n_seen == 14


def test_stateful_flags_a_square_stream_but_not_the_test_split_in_order(stateful, tiny_model, digits_splits):
    assert _benign(stateful, digits_splits.test.x) == {}
    om = ObservedModel(tiny_model, {"stateful": stateful}, key="attacker")
    square = registry.create("evasion", "square", eps=0.05, max_queries=100)
    for i in range(3):
        square(om, digits_splits.test.x[i:i + 1], digits_splits.test.y[i:i + 1])
    assert "stateful" in om.first_detection_ and om.first_detection_["stateful"] <= om.queries_


def test_stateful_state_is_per_key_and_bounded(stateful, digits_splits):
    x = digits_splits.test.x[:1].expand(60, -1, -1, -1)  # 60 identical queries: an obvious attack
    assert stateful.observe("a", x).flagged
    fresh = stateful.observe("b", x[:10])
    assert not fresh.flagged and fresh.n_seen == 10  # another key starts from nothing
    small = StatefulDetector(k=2, history=5, threshold=1.0, max_keys=2)
    for key in "abc":
        small.observe(key, digits_splits.test.x[:12])
    assert len(small._store) == 2 and small._store.get("c").feats.shape[0] == 5
    with pytest.raises(ConfigError, match="threshold"):
        StatefulDetector().observe("k", x)


def test_prada_flags_a_jacobian_augmentation_stream_but_not_natural_queries(tiny_model, digits_splits):
    def classify(x):
        return tiny_model(x).argmax(1)

    prada = PRADA(classify=classify)
    assert _benign(prada, digits_splits.test.x) == {}
    om = ObservedModel(tiny_model, {"prada": prada}, key="thief", chunk=1)
    attack = registry.create("extraction", "jacobian_augmentation", seed_size=30, surrogate="tiny_cnn", epochs=5)
    attack.extract(ExtractionOracle(om, budget=400, output="labels"), digits_splits.train.x, num_classes=10)
    assert "prada" in om.first_detection_


def test_volume_anomaly_flags_a_burst_per_key_and_globally():
    now = [0.0]
    vol = VolumeAnomaly(bucket_s=1.0, baseline_buckets=10, sigma=3.0, warmup_buckets=5, clock=lambda: now[0])
    q = torch.zeros(1, 1, 2, 2)
    for t in range(12):
        now[0] = t + 0.5
        for key in ("steady", "quiet"):
            for _ in range(5 if key == "steady" else 1):
                v = vol.observe(key, q)
                assert not v.flagged
    now[0] = 12.5
    verdicts = [vol.observe("steady", q) for _ in range(30)]
    assert verdicts[-1].flagged and not verdicts[0].flagged and verdicts[-1].n_seen == 12 * 5 + 30
    assert vol.global_verdict().flagged
    assert not vol.observe("quiet", q).flagged
    young = VolumeAnomaly(prior_rate=4.0, clock=lambda: now[0])
    assert [young.observe("new", q.expand(n, -1, -1, -1)).flagged for n in (3, 20)] == [False, True]
