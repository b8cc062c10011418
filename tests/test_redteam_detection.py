"""queries-to-detection of ``safedl redteam`` (redteam/runner.py): only the attack's adversarial queries can be a
detection; a clean probe sent unchanged (HopSkipJump's first query of each probe) that the service rejects is a
false alarm, reported with its n and Wilson interval. A fake service answers a tiny model's labels and rejects
the images its rule says; the probes are class-0 images, so a rejected answer (class 0 to a label-only attacker)
reads as "still correct" and the attack goes on searching."""
from __future__ import annotations

import torch

from safedl.redteam.budget import RunBudget
from safedl.redteam.runner import digests, run_blackbox
from safedl.redteam.textfile import write_slis


class FakeService:
    """``ServiceClient.predict`` over ``model``: rejects an image when ``reject(is_clean_probe)`` is True."""

    def __init__(self, model, clean: torch.Tensor, reject):
        self.model, self.clean, self.reject = model, set(digests(clean)), reject
        self.requests: list[list[bool]] = []  # per request: which rows were clean probes

    def predict(self, x, *, deadline=None):
        with torch.no_grad():
            probs = self.model(x).softmax(1)
        flags = [k in self.clean for k in digests(x)]
        self.requests.append(flags)
        rows = [{"index": i, "rejected": bool(self.reject(c)), "reason": "test" if self.reject(c) else None,
                 "label": int(p.argmax()), "probabilities": p.tolist()} for i, (p, c) in enumerate(zip(probs, flags))]
        return {"tier": "full", "results": rows}


def _run(tiny_model, digits_splits, reject):
    zeros = digits_splits.test.y == 0  # a rejection reads as class 0 (labels access): the attack goes on
    x, y = digits_splits.test.x[zeros][:12], digits_splits.test.y[zeros][:12]
    svc = FakeService(tiny_model, x, reject)
    out = run_blackbox("hopskipjump", client=svc, x=x, y=y, eps=0.5, queries_per_image=40,
                       budget=RunBudget(max_queries=100_000, budget_s=120), num_classes=10, seed=0)
    return out, svc


def test_rejected_clean_probes_are_false_alarms_not_a_detection(tiny_model, digits_splits, tmp_path):
    out, svc = _run(tiny_model, digits_splits, reject=lambda clean: clean)
    clean_sent = sum(sum(r) for r in svc.requests)
    assert clean_sent >= 12  # HopSkipJump asks about every clean probe first
    assert out.queries_to_detection is None
    assert out.clean_queries == out.false_alarms == clean_sent
    assert out.adversarial_queries == out.queries - clean_sent > 0
    lo, hi = out.false_alarm_ci95
    assert 0.7 < lo < hi == 1.0
    prom = tmp_path / "slis.prom"
    write_slis(prom, outcomes=[out], bundle_version="v", release={}, breaches=[], started=0.0)
    text = prom.read_text()
    assert f'safedl_redteam_false_alarms{{attack="hopskipjump",bundle_version="v",eps="0.5"}} {clean_sent}.0' in text
    assert 'safedl_redteam_detected{attack="hopskipjump",bundle_version="v",eps="0.5"} 0.0' in text
    assert "safedl_redteam_queries_to_detection{" not in text


def test_queries_to_detection_counts_the_adversarial_images_only(tiny_model, digits_splits):
    out, svc = _run(tiny_model, digits_splits, reject=lambda clean: True)
    first_adv = next(i for i, r in enumerate(svc.requests) if not all(r))
    adversarial_before = sum(len(r) - sum(r) for r in svc.requests[:first_adv + 1])
    assert out.queries_to_detection == adversarial_before
    assert out.false_alarms == out.clean_queries >= 12
