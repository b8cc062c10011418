"""LastLayerMAD prediction poisoning in `safedl serve` (issue 26, ``--poisoning-epsilon``): score-tier answers are
poisoned within the L1 budget with every label kept; label-tier keys and a service without the flag are unchanged."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _monitor_helpers import npy  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve.app import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.config import ServeConfig  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402


def _answers(bundle, root, x, *, epsilon: float) -> dict[str, list[dict]]:
    keys = KeyStore(root / f"k{epsilon}.db", create=True)
    tok = {t: keys.create(name=t, tier=t, rate_per_s=1e4, burst=10_000)[1] for t in ("full", "label")}
    app = create_app(bundle=load_bundle(bundle), keys=keys, audit=AuditStore(root / f"a{epsilon}.db"),
                     config=ServeConfig(poisoning_epsilon=epsilon))
    with TestClient(app) as client:
        out = {}
        for tier, t in tok.items():
            r = client.post("/v1/predict", content=npy(x), headers={"Authorization": f"Bearer {t}",
                                                                    "Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            out[tier] = r.json()["results"]
    return out


def test_score_answers_are_poisoned_within_the_budget_and_every_label_is_kept(tiny_model, digits_splits, tmp_path):
    bundle = make_bundle(tiny_model, digits_splits, tmp_path / "bundle", detect=False)
    x = digits_splits.test.x[:64]
    d = load_bundle(bundle).pipeline.decide(x)
    on = _answers(bundle, tmp_path, x, epsilon=1.0)
    off = _answers(bundle, tmp_path, x, epsilon=0.0)
    p_on = torch.tensor([r["probabilities"] for r in on["full"]])
    p_off = torch.tensor([r["probabilities"] for r in off["full"]])
    l1 = (p_on - p_off).abs().sum(1)
    assert float(l1.max()) <= 1.0 + 1e-4 and float(l1.mean()) > 0.2
    assert torch.allclose(p_off, d.probs, atol=1e-5)  # off: the pipeline's scores
    for tier in ("full", "label"):
        assert [r["label"] for r in on[tier]] == d.labels.tolist() == [r["label"] for r in off[tier]]
