"""The DAWN response watermark in `safedl serve` (issue 26): with ``--watermark-key-file`` the service alters the
keyed-hash-selected answers (at most 0.5%), on every tier, the same way each time; the key appears in no log and no
repr; without a key no answer is altered; a bad rate or key file is refused with exit 2."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _monitor_helpers import npy  # noqa: E402
from _serve_helpers import make_bundle  # noqa: E402
from safedl.defenses.ownership import ResponseWatermark  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.errors import UserError  # noqa: E402
from safedl.serve.app import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.config import ServeConfig  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.options import options_from_flags  # noqa: E402

KEY = b"serve-watermark-test-key-0123456789"
TIERS = ("full", "rounded", "topk", "label")


@pytest.fixture(scope="module")
def bundle(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("wm") / "bundle", detect=False)


def _served_labels(bundle, root, x, *, key: bytes | None, rounds: int = 1) -> dict[str, list[torch.Tensor]]:
    keys = KeyStore(root / "k.db", create=True)
    tok = {t: keys.create(name=t, tier=t, rate_per_s=1e4, burst=10_000, daily_quota=10**6)[1] for t in TIERS}
    app = create_app(bundle=load_bundle(bundle), keys=keys, audit=AuditStore(root / "a.db"),
                     config=ServeConfig(watermark_key=key))
    out: dict[str, list[torch.Tensor]] = {t: [] for t in TIERS}
    with TestClient(app) as client:
        for _ in range(rounds):
            for tier, t in tok.items():
                got = []
                for i in range(0, len(x), 64):
                    r = client.post("/v1/predict", content=npy(x[i:i + 64]),
                                    headers={"Authorization": f"Bearer {t}", "Content-Type": "application/x-npy"})
                    assert r.status_code == 200, r.text
                    got += [e["label"] for e in r.json()["results"]]
                out[tier].append(torch.tensor(got))
    return out


def test_the_service_watermarks_the_keyed_answers_on_every_tier_the_same_way_each_time(bundle, digits_splits,
                                                                                       tmp_path, caplog):
    x = torch.cat([digits_splits.train.x, digits_splits.val.x])
    model = load_bundle(bundle).pipeline.decide(x).labels
    mask, wm = ResponseWatermark(key=KEY, num_classes=10, rate=0.005).select(x, model)
    assert 1 <= int(mask.sum()) <= 0.005 * len(x) * 2  # a keyed ~0.5% of the answers
    with caplog.at_level(logging.DEBUG):
        served = _served_labels(bundle, tmp_path, x, key=KEY, rounds=2)
    for tier in TIERS:
        first, again = served[tier]
        assert torch.equal(first, again)  # deterministic: repeating a query cannot average the watermark away
        assert torch.equal(first[mask], wm[mask]), tier  # the watermarked answers carry the watermark label
        assert torch.equal(first[~mask], model[~mask]), tier  # and no other answer changed
    assert KEY.decode() not in caplog.text and KEY.decode() not in repr(ServeConfig(watermark_key=KEY))


def test_without_a_key_no_answer_is_altered(bundle, digits_splits, tmp_path):
    x = digits_splits.train.x[:256]
    served = _served_labels(bundle, tmp_path, x, key=None)
    assert torch.equal(served["label"][0], load_bundle(bundle).pipeline.decide(x).labels)


def test_bad_watermark_flags_are_refused_naming_the_flag(tmp_path):
    flags = dict(bundle=tmp_path / "b", keys=tmp_path / "k.db", audit=tmp_path / "a.db", audit_max_mb=None,
                 host="127.0.0.1", port=8000, trusted_proxy=[], max_body_mb=8.0, max_images=64,
                 max_pixels=4_000_000, max_request_pixels=16_000_000, key_pixels_per_s=2e6, no_resize=False,
                 max_batch=64, max_wait_ms=3.0, header_timeout_s=10.0, body_timeout_s=30.0, min_body_kbps=16.0,
                 keepalive_s=5.0, max_connections=100, max_connections_per_client=10, unauth_rate=1.0,
                 unauth_burst=20, slow_lane_rate=1.0, review=None, quarantine=None, review_mb=100.0,
                 review_days=30.0, device="cpu", torch_threads=1, workers=1, graceful_s=30.0,
                 signing_key_file=None, monitor_config=None)
    with pytest.raises(UserError, match="--watermark-rate"):
        options_from_flags(**flags, watermark_rate=0.05)
    (tmp_path / "short.key").write_bytes(b"abc")
    with pytest.raises(UserError, match="--watermark-key-file .*16 bytes"):
        options_from_flags(**flags, watermark_key_file=tmp_path / "short.key")
    (tmp_path / "good.key").write_bytes(KEY)
    assert options_from_flags(**flags, watermark_key_file=tmp_path / "good.key").config.watermark_key == KEY
