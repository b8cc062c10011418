"""The output sanity check (deploy/output_sanity.py): a confident answer on an input far from the training data is
refused with its own reason and metric; in-distribution inputs pass; the check survives the bundle round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import audit_rows, make_bundle, npy_bytes  # noqa: E402
from safedl.deploy import SecurePipeline, export_bundle, load_bundle  # noqa: E402
from safedl.deploy.output_sanity import REASON, OutputSanity  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402


def _noise(n, shape, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sanity(digits_splits):
    return OutputSanity(max_confidence=0.9, quantile=0.99).fit(digits_splits.train.x, digits_splits.val.x)


def test_far_and_confident_is_refused_near_or_unsure_is_not(sanity, digits_splits):
    test = digits_splits.test.x
    far = _noise(50, digits_splits.shape)
    n = len(test)
    beyond = int((sanity.distance(test) > sanity.distance_threshold_).sum())
    assert beyond / n < 0.05, (beyond, n)  # the 99% quantile of validation distances: few clean test images beyond
    assert bool((sanity.distance(far) > sanity.distance_threshold_).all())
    confident = torch.full((50, 10), 0.0).index_fill_(1, torch.tensor([3]), 1.0)
    unsure = torch.full((50, 10), 0.1)
    assert bool(sanity.check(far, confident).all()) and not bool(sanity.check(far, unsure).any())
    assert int(sanity.check(test, torch.full((n, 10), 0.0).index_fill_(1, torch.tensor([3]), 1.0)).sum()) == beyond


@pytest.mark.parametrize("kw", [{"max_confidence": 1.0}, {"max_confidence": 0}, {"quantile": 1.5}])
def test_bad_settings_are_one_clear_error(kw):
    with pytest.raises(UserError, match="--sanity-"):
        OutputSanity(**kw)


def _pipeline(model, splits, sanity):
    return SecurePipeline(model=model, class_names=splits.train.class_names, input_shape=splits.shape,
                          output_sanity=sanity)


def test_pipeline_rejects_with_its_reason_and_the_bundle_keeps_the_check(tiny_model, digits_splits, tmp_path):
    # max_confidence 0.1: every answer of 10 classes is above it, so far inputs alone decide (deterministic)
    check = OutputSanity(max_confidence=0.1, quantile=0.99).fit(digits_splits.train.x, digits_splits.val.x)
    pipe = _pipeline(tiny_model, digits_splits, check)
    x = torch.cat([digits_splits.test.x[:20], _noise(5, digits_splits.shape)])
    d = pipe.decide(x)
    assert d.reasons[20:] == [REASON] * 5 and bool(d.rejected[20:].all())
    assert bool((d.rejected[:20] == (check.distance(x[:20]) > check.distance_threshold_)).all())
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(digits_splits.mean), "std": list(digits_splits.std)}
    data = {"name": "digits", "shape": list(digits_splits.shape), "num_classes": 10,
            "class_names": digits_splits.train.class_names}
    b = load_bundle(export_bundle(pipe, tmp_path / "b", model_spec=spec, data=data))
    assert b.manifest["output_sanity"]["distance_threshold"] == check.distance_threshold_
    again = b.pipeline.decide(x)
    assert again.reasons == d.reasons and torch.equal(again.rejected, d.rejected)
    assert load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "plain")).pipeline.output_sanity is None


def test_service_answers_the_reason_counts_the_metric_and_audits_it(tiny_model, digits_splits, tmp_path):
    check = OutputSanity(max_confidence=0.1, quantile=0.99).fit(digits_splits.train.x, digits_splits.val.x)
    plain = load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "plain"))
    bundle = load_bundle(export_bundle(plain.pipeline, tmp_path / "b", data=plain.manifest["data"],
                                       model_spec={k: v for k, v in plain.manifest["model"].items() if k != "file"},
                                       output_sanity=check))
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="u", tier="label", rate_per_s=1000, burst=1000)[1]
    scraper = keys.create(name="m", scopes=("metrics",), rate_per_s=1000, burst=1000)[1]
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "a.db"), config=ServeConfig())
    far = _noise(2, digits_splits.shape, seed=1).numpy().astype(np.float32)
    with TestClient(app) as client:
        r = client.post("/v1/predict", content=npy_bytes(far), headers={"Authorization": f"Bearer {token}",
                                                                         "Content-Type": "application/x-npy"})
        assert r.status_code == 200, r.text
        assert [(x["rejected"], x["reason"], x["label"]) for x in r.json()["results"]] == [(True, REASON, None)] * 2
        text = client.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
    assert 'safedl_output_sanity_rejected_total{check="overconfident_far"} 2.0' in text
    rows = audit_rows(tmp_path / "a.db", "endpoint = '/v1/predict'")
    assert [(x["rejected"], x["reason"]) for x in rows] == [(1, REASON)] * 2
