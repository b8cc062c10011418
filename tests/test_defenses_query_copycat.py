"""Natural-image model stealing (issue 26): the per-key copycat detector and the cross-key (Sybil) detector on
small seeded traffic of the 8x8 digits (benign profiles are not flagged, copycat pools of another distribution are)."""
from __future__ import annotations

import math

import pytest
import torch

from safedl import registry
from safedl.defenses.query import CopycatDetector, ObservedModel, PixelSubspace, QueryDetector, SybilDetector
from safedl.defenses.query.ood_share import binomial_tail, window_counts
from safedl.defenses.query.streams import burst_stream, calibration_streams, in_order_stream
from safedl.errors import ConfigError, NotFittedError
from safedl.evaluate.attack_extraction import attacker_pool


@pytest.fixture(scope="module")
def calib(digits_splits):
    return calibration_streams(digits_splits.train.x, seed=0)


@pytest.fixture(scope="module")
def benign(digits_splits):
    return torch.cat([digits_splits.test.x, digits_splits.val.x])


@pytest.fixture(scope="module")
def ood_pool(digits_splits):
    """The copycat's pool: MNIST digits resized to 8x8 (another distribution of the same task), seeded order."""
    pool = attacker_pool(digits_splits, "mnist5k")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(3))]


def benign_profiles(x: torch.Tensor, y: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Honest keys: a natural stream, one class dominating, retry bursts, repeated images, a long-running key."""
    g = torch.Generator().manual_seed(11)
    heavy = torch.where(y == 3)[0]
    pick = torch.where(torch.rand(n, generator=g) < 0.8, heavy[torch.randint(len(heavy), (n,), generator=g)],
                       torch.randint(len(x), (n,), generator=g))
    return {"natural": in_order_stream(x, n, seed=1), "one_class": x[pick], "bursts": burst_stream(x, n, seed=2),
            "repeats": x[torch.randint(20, (n,), generator=g)], "long_running": in_order_stream(x, 2 * n, seed=4)}


def _first(det, stream, key, chunk=25):
    om = ObservedModel(torch.nn.Identity(), {"d": det}, key=key, chunk=chunk)
    for i in range(0, len(stream), 50):
        om(stream[i:i + 50])
    return om.first_detection_.get("d")


def test_binomial_window_matches_a_slow_reference():
    hist = torch.tensor([True, False, True, True])
    new = torch.tensor([False, True, True])
    k, n = window_counts(hist, new, 3)
    seq = hist.tolist() + new.tolist()
    assert k.tolist() == [sum(seq[max(0, e - 3):e]) for e in (5, 6, 7)] and n.tolist() == [3, 3, 3]
    p = binomial_tail(torch.tensor([0, 2, 5]), torch.tensor([10, 10, 10]), 0.1)
    slow = [sum(math.comb(10, j) * 0.1 ** j * 0.9 ** (10 - j) for j in range(kk, 11)) for kk in (0, 2, 5)]
    assert p.tolist() == pytest.approx(slow, rel=1e-9)


def test_subspace_residual_is_zero_inside_and_its_record_round_trips(digits_splits):
    ss = PixelSubspace(components=8).fit(digits_splits.train.x, quantile=0.05)
    inside = (ss.mean_ + 0.3 * ss.basis_[0] - 0.2 * ss.basis_[3]).float().reshape(1, 1, 8, 8)
    assert float(ss.residual(inside)[0]) == pytest.approx(0.0, abs=1e-5)
    back = PixelSubspace.from_record(ss.to_record())
    assert torch.equal(back.outside(digits_splits.test.x), ss.outside(digits_splits.test.x))
    with pytest.raises(ConfigError, match="fitted to 64"):
        ss.residual(torch.zeros(2, 1, 4, 4))


def test_copycat_keeps_the_protocol_and_is_registered(calib, benign):
    det = registry.create("query_detector", "copycat").calibrate(calib)
    assert isinstance(det, QueryDetector) and det.threshold_ is not None
    v = det.observe("a", benign[:30])
    assert v.n_seen == 30 and not v.flagged and v.score == 0.0  # fewer than min_queries: not judged
    assert det.observe("b", benign[:5]).n_seen == 5
    det.reset("a")
    assert det.observe("a", benign[:5]).n_seen == 5
    with pytest.raises(ConfigError, match="window"):
        CopycatDetector(window=10, min_queries=50)
    with pytest.raises(NotFittedError, match="CopycatDetector is not fitted yet"):
        CopycatDetector().observe("a", benign[:5])


def test_benign_profiles_are_not_flagged_and_an_ood_copycat_is(calib, benign, digits_splits, ood_pool):
    det = CopycatDetector().calibrate(calib)
    y = torch.cat([digits_splits.test.y, digits_splits.val.y])
    for name, stream in benign_profiles(benign, y, 1500).items():
        assert _first(det, stream, f"benign-{name}") is None, name
    at = _first(det, ood_pool[:1000], "copycat")
    assert at is not None and at < 1000


def test_sybil_flags_a_copycat_split_over_five_keys_and_no_benign_key(calib, benign, ood_pool):
    kw = {"alpha": 1e-4}
    sybil = SybilDetector(**kw).calibrate(calib)
    per_key = CopycatDetector(subspace=sybil.subspace_, **kw)
    benign_keys = [in_order_stream(torch.roll(benign, -97 * j, 0), 600, seed=20 + j) for j in range(5)]
    attack = ood_pool[:600].chunk(5)  # 120 queries per attacker key
    flagged_s, flagged_k = {}, {}
    for step in range(0, 120, 10):  # the keys interleave, 10 queries at a time
        for j in range(5):
            for name, x in ((f"benign-{j}", benign_keys[j][step * 5:step * 5 + 50]),
                            (f"sybil-{j}", attack[j][step:step + 10])):
                for det, seen in ((sybil, flagged_s), (per_key, flagged_k)):
                    v = det.observe(name, x)
                    if v.flagged:
                        seen.setdefault(name, v.first_at)
    assert set(flagged_s) == {f"sybil-{j}" for j in range(5)}
    assert not set(flagged_k) & {f"benign-{j}" for j in range(5)}
    assert all(v <= 120 for v in flagged_s.values())
    quiet = SybilDetector(subspace=per_key.subspace_, **kw)
    for j in range(5):
        for i in range(0, 600, 50):
            assert not quiet.observe(f"benign-{j}", benign_keys[j][i:i + 50]).flagged
    assert not quiet.global_verdict().flagged
