"""The rollout checks' statistics: the paired one-sided bound (Newcombe 1998), the p99 lower bound, and each
check deciding on synthetic probe answers."""
from __future__ import annotations

import pytest
import torch

from safedl.decide.paired import paired_difference, proportion_bounds
from safedl.deploy.probes import probe_set
from safedl.serve.rollout.checks import ProbeRun, evaluate, quantile_lower_bound
from safedl.serve.rollout.config import Checks


def test_paired_difference_bounds_cover_the_difference_and_tighten_with_n():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, generator=g) < 0.9
    b = a.clone()
    b[:10] = ~b[:10]
    d = paired_difference(a, b)
    assert d["lower"] < d["value"] < d["upper"] and d["n"] == 200
    assert d["value"] == pytest.approx(float(a.float().mean() - b.float().mean()))
    same = paired_difference(a, a)
    assert same["value"] == 0 and same["lower"] < 0 < same["upper"]
    big = paired_difference(a.repeat(10), a.repeat(10))
    assert big["upper"] - big["lower"] < same["upper"] - same["lower"]
    assert paired_difference(torch.ones(200, dtype=torch.bool), torch.zeros(200, dtype=torch.bool))["lower"] > 0.95


def test_paired_difference_is_tighter_than_the_unpaired_bound_for_correlated_pairs():
    """Pairs that mostly agree carry more information than two independent samples (phi > 0)."""
    a = torch.zeros(200, dtype=torch.bool)
    a[:100] = True
    b = a.clone()
    b[:4] = False  # canary loses 4 of 200
    paired = paired_difference(a, b)
    lo_a, hi_a = proportion_bounds(100, 200)["lower"], proportion_bounds(100, 200)["upper"]
    lo_b, hi_b = proportion_bounds(96, 200)["lower"], proportion_bounds(96, 200)["upper"]
    unpaired_half = ((hi_a - lo_a) ** 2 + (hi_b - lo_b) ** 2) ** 0.5 / 2
    assert paired["upper"] - paired["value"] < unpaired_half


def test_quantile_lower_bound_is_not_decided_by_one_spike():
    xs = [0.001] * 63 + [1.0]
    assert quantile_lower_bound(xs) == 0.001
    assert quantile_lower_bound([0.001] * 58 + [1.0] * 6) == 1.0


def _probes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 8, 8, generator=g)
    y = torch.randint(1, 10, (300,), generator=g)
    return probe_set(clean=(x[:100], y[:100]), adversarial=[(x[100:200], y[100:200])],
                     triggered=[(x[200:], y[200:], torch.zeros(100, dtype=torch.long))], n=100)


def _run(labels, rejected=None):
    return ProbeRun(labels, torch.zeros_like(labels, dtype=torch.bool) if rejected is None else rejected, [], 0, 5)


def _by_name(checks):
    return {c["check"]: c for c in checks}


def test_each_check_fails_on_its_own_breach_only():
    ps = _probes()
    lat = {"stable": [0.01] * 64, "canary": [0.01] * 64}
    stable = _run(ps.y.clone())
    assert all(c["passed"] for c in evaluate(ps, stable, _run(ps.y.clone()), lat, cfg=Checks()))
    hit = ps.y.clone()
    hit[ps.mask("triggered")] = 0  # every triggered probe goes to the target
    failed = [c["check"] for c in evaluate(ps, stable, _run(hit), lat, cfg=Checks()) if not c["passed"]]
    assert failed == ["backdoor_asr_increase"]
    wrong_adv = ps.y.clone()
    wrong_adv[ps.mask("adversarial")] = (wrong_adv[ps.mask("adversarial")] + 1) % 10
    rejected = ps.mask("adversarial").clone()  # ... but rejected: robust
    assert _by_name(evaluate(ps, stable, _run(wrong_adv, rejected), lat, cfg=Checks()))["robust_accuracy_drop"][
        "passed"]
    failed = [c["check"] for c in evaluate(ps, stable, _run(wrong_adv), lat, cfg=Checks()) if not c["passed"]]
    assert failed == ["robust_accuracy_drop"]
    slow = {"stable": [0.01] * 64, "canary": [0.05] * 64}
    failed = [c["check"] for c in evaluate(ps, stable, _run(ps.y.clone()), slow, cfg=Checks()) if not c["passed"]]
    assert failed == ["latency_p99"]
    erring = evaluate(ps, stable, _run(ps.y.clone()), lat, cfg=Checks(), traffic=(30, 200))
    assert [c["check"] for c in erring if not c["passed"]] == ["error_rate"]


def test_non_inferiority_mode_is_stricter_than_evidence_mode():
    ps = _probes()
    lat = {"stable": [0.01] * 64, "canary": [0.01] * 64}
    worse = ps.y.clone()
    idx = ps.mask("clean").nonzero().flatten()[:3]
    worse[idx] = (worse[idx] + 1) % 10  # 3 of 100 clean probes lost: a 3-point drop, within noise
    ev = _by_name(evaluate(ps, _run(ps.y.clone()), _run(worse), lat, cfg=Checks()))["clean_accuracy_drop"]
    ni = _by_name(evaluate(ps, _run(ps.y.clone()), _run(worse), lat, cfg=Checks(mode="non_inferiority")))[
        "clean_accuracy_drop"]
    assert ev["passed"] and not ni["passed"]
    assert ev["bound"] < 0.02 < ni["bound"]


def test_non_inferiority_holds_on_too_little_evidence_and_fails_on_a_shown_breach():
    ps = _probes()
    lat = {"stable": [0.01] * 64, "canary": [0.01] * 64}
    ni = Checks(mode="non_inferiority")
    worse = ps.y.clone()
    idx = ps.mask("clean").nonzero().flatten()[:3]
    worse[idx] = (worse[idx] + 1) % 10  # a 3-point drop within noise: neither shown nor excluded
    held = _by_name(evaluate(ps, _run(ps.y.clone()), _run(worse), lat, cfg=ni))["clean_accuracy_drop"]
    assert held["hold"] and not held["passed"] and "insufficient evidence, n=100" in held["note"]
    idx = ps.mask("clean").nonzero().flatten()[:40]
    worse[idx] = (worse[idx] + 1) % 10  # 40 points lost: a breach even in the canary's favour
    failed = _by_name(evaluate(ps, _run(ps.y.clone()), _run(worse), lat, cfg=ni))["clean_accuracy_drop"]
    assert not failed["passed"] and not failed["hold"]
    # 0 errors in 5 probe calls + 64 latency calls: the 5xx bound is far above 1% -> hold, not a rollback;
    # enough user traffic without errors is the evidence that passes it
    few = _by_name(evaluate(ps, _run(ps.y.clone()), _run(ps.y.clone()), lat, cfg=ni))["error_rate"]
    assert few["hold"] and few["n"] == 69 and few["note"].startswith("insufficient evidence, n=69")
    many = _by_name(evaluate(ps, _run(ps.y.clone()), _run(ps.y.clone()), lat, cfg=ni, traffic=(0, 1000)))
    assert many["error_rate"]["passed"] and many["error_rate"]["n"] == 1069
    ev = _by_name(evaluate(ps, _run(ps.y.clone()), _run(ps.y.clone()), lat, cfg=Checks()))["error_rate"]
    assert ev["passed"] and not ev["hold"]  # evidence mode never holds
