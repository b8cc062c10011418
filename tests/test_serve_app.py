"""The service in-process (FastAPI TestClient): auth, tiers, input decoding and limits, audit before answer,
health/ready/model/metrics."""
from __future__ import annotations

import base64
import io
import json
import sqlite3
import struct
import time
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from _serve_helpers import audit_rows, make_bundle, npy_bytes, png_bytes, quantized  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.schemas import ErrorResponse, PredictResponse  # noqa: E402


DET = "feature_squeezing_detector"


@pytest.fixture(scope="module")
def bundle(tiny_model, digits_splits, tmp_path_factory):
    """A real bundle (feature squeezing + its detector around the tiny digits CNN), loaded and verified."""
    return load_bundle(make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("serve") / "bundle"))


class Svc:
    def __init__(self, tmp_path, bundle, config=None, audit=None):
        self.keys = KeyStore(tmp_path / "keys.db", create=True)
        self.tokens = {}
        for tier in ("full", "rounded", "topk", "label"):
            self.tokens[tier] = self.keys.create(name=tier, tier=tier, rate_per_s=1000, burst=1000)[1]
        self.scraper = self.keys.create(name="scraper", scopes=("metrics",), rate_per_s=1000, burst=1000)[1]
        self.audit_path = tmp_path / "audit.db"
        self.app = create_app(bundle=bundle, keys=self.keys, audit=audit or AuditStore(self.audit_path),
                              config=config or ServeConfig())

    def rows(self, where: str = "1=1") -> list[dict]:
        return audit_rows(self.audit_path, where)


@pytest.fixture
def svc(tmp_path, bundle):
    s = Svc(tmp_path, bundle)
    with TestClient(s.app) as client:
        s.client = client
        yield s


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def _post_png(svc, img, tier="full", fmt="PNG", **kw):
    files = {"file": (f"x.{fmt.lower()}", png_bytes(img, fmt), f"image/{fmt.lower()}")}
    return svc.client.post("/v1/predict", files=files, headers=_auth(svc.tokens[tier]), **kw)


def _correct_digits(pipeline, x, y, n=4):
    d = pipeline.decide(quantized(x))
    pred = torch.where(d.rejected, -1, d.labels)
    idx = (pred == y).nonzero().flatten()[:n]
    return x[idx], y[idx]


def test_png_of_a_test_digit_gets_its_label_and_an_audit_row_first(svc, bundle, eval_batch):
    x, y = _correct_digits(bundle.pipeline, *eval_batch)
    r = _post_png(svc, x[0])
    assert r.status_code == 200, r.text
    body = PredictResponse.model_validate(r.json())
    res = body.results[0]
    assert res.label == int(y[0]) and res.class_name == str(int(y[0])) and not res.rejected
    assert abs(sum(res.probabilities) - 1) < 1e-4 and set(res.detector_scores) == {DET}
    assert body.bundle_version == bundle.version and r.headers["x-request-id"] == body.request_id
    rows = svc.rows(f"request_id='{body.request_id}'")
    assert len(rows) == 1 and rows[0]["http_status"] == 200 and rows[0]["label"] == int(y[0])
    assert rows[0]["input_sha256"] == res.input_sha256 and json.loads(rows[0]["shape"]) == [1, 8, 8]
    assert rows[0]["key_id"] is not None and rows[0]["bundle_version"] == bundle.version


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "WEBP"])
def test_other_image_formats_decode(svc, bundle, eval_batch, fmt):
    x, _ = eval_batch
    r = _post_png(svc, x[0], fmt=fmt)
    assert r.status_code == 200, r.text
    if fmt != "JPEG":  # lossless: exactly what the bundle answers for the 8-bit image
        assert r.json()["results"][0]["label"] == int(bundle.pipeline.decide(quantized(x[:1])).labels[0])


def _answers(pipeline, x):
    d = pipeline.decide(x)
    return [None if r else int(lab) for lab, r in zip(d.labels, d.rejected)]


def test_json_base64_and_npy_batches_match_the_bundle(svc, bundle, eval_batch):
    x, _ = eval_batch
    expected = _answers(bundle.pipeline, x[:5])
    r = svc.client.post("/v1/predict", content=npy_bytes(x[:5].numpy()), headers={
        **_auth(svc.tokens["full"]), "Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert [res["label"] for res in r.json()["results"]] == expected
    assert len(svc.rows(f"request_id='{r.json()['request_id']}'")) == 5
    u8 = (x[:3] * 255).round().to(torch.uint8).numpy()
    r = svc.client.post("/v1/predict", json={"images": [base64.b64encode(npy_bytes(u8)).decode(),
                                                        base64.b64encode(png_bytes(x[3])).decode()]},
                        headers=_auth(svc.tokens["full"]))
    assert r.status_code == 200, r.text
    assert [res["label"] for res in r.json()["results"]] == _answers(bundle.pipeline, quantized(x[:4]))


def test_auth_missing_wrong_revoked_and_scope(svc, eval_batch):
    img = png_bytes(eval_batch[0][0])
    post = lambda headers: svc.client.post("/v1/predict", content=img, headers={"Content-Type": "image/png", **headers})
    assert post({}).status_code == 401
    good = svc.tokens["full"]
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    assert post(_auth(wrong)).status_code == 401
    assert post({"X-API-Key": good}).status_code == 200
    for bad in ("../../etc/passwd", "sdl_" + "0" * 12 + "_/../../x" * 5, "x" * 5000, "Basic " + good):
        r = post({"X-API-Key": bad})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    _, only_model = svc.keys.create(name="reader", scopes=("model",))
    assert post(_auth(only_model)).status_code == 403
    assert svc.client.get("/v1/model", headers=_auth(only_model)).status_code == 200
    _, pred_only = svc.keys.create(name="pred", scopes=("predict",))
    assert svc.client.get("/v1/model", headers=_auth(pred_only)).status_code == 403
    svc.keys.revoke("full")
    r = post(_auth(good))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    rows = svc.rows("endpoint='/v1/predict'")
    statuses = [row["http_status"] for row in rows]
    # a valid key's refusal is one row under that key; failures before authentication are counted in aggregate
    assert statuses.count(401) == 0 and statuses.count(403) == 1
    assert [r["key_id"] for r in rows if r["http_status"] == 403] == [svc.keys.authenticate(only_model).key_id]
    svc.app.state.service.flush_unauthenticated()
    conn = sqlite3.connect(svc.audit_path)
    agg = conn.execute("SELECT endpoint, code, SUM(count) FROM unauthenticated GROUP BY endpoint, code").fetchall()
    conn.close()
    assert agg == [("/v1/predict", "unauthorized", 7)]


def test_keys_are_stored_hashed(svc):
    token = svc.tokens["full"]
    secret = token.split("_", 2)[2]
    raw = (svc.keys.path).read_bytes()
    assert secret.encode() not in raw and token.encode() not in raw


def test_tiers_harden_the_output_per_key(svc, eval_batch):
    img = eval_batch[0][0]
    full = _post_png(svc, img, "full").json()["results"][0]
    rounded = _post_png(svc, img, "rounded").json()["results"][0]
    topk = _post_png(svc, img, "topk").json()["results"][0]
    label = _post_png(svc, img, "label").json()["results"][0]
    assert full["label"] == rounded["label"] == topk["label"] == label["label"]
    assert len(full["probabilities"]) == 10 and full["detector_scores"]
    assert all(abs(p * 100 - round(p * 100)) < 1e-6 for p in rounded["probabilities"])
    assert rounded["probabilities"] != full["probabilities"] and rounded["detector_scores"] is None
    assert [t["label"] for t in topk["top_k"]][0] == full["label"] and len(topk["top_k"]) == 3
    assert topk["probabilities"] is None and topk["top_k"][0]["class_name"] == full["class_name"]
    assert label["probabilities"] is None and label["top_k"] is None and label["detector_scores"] is None


def test_rejected_image_has_no_label_and_is_counted(svc, bundle, eval_batch):
    x = quantized(eval_batch[0])
    d = bundle.pipeline.decide(x)
    i = int(d.rejected.nonzero()[0])  # a test image the bundle's detector flags
    r = _post_png(svc, x[i], "full")
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["rejected"] and res["reason"] == f"detector:{DET}"
    assert res["label"] is None and res["probabilities"] is None
    assert res["detector_scores"][DET] == pytest.approx(float(d.detector_scores[DET][i]), abs=1e-5)
    assert res["detector_scores"][DET] > d.thresholds[DET]
    row = svc.rows(f"request_id='{r.json()['request_id']}'")[0]
    assert row["rejected"] == 1 and row["label"] is not None  # the audit keeps the model's label for forensics
    text = svc.client.get("/metrics", headers=_auth(svc.scraper)).text
    assert f'safedl_images_rejected_total{{reason="detector:{DET}"}} 1.0' in text


def _png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h, then a tiny compressed IDAT: a few hundred bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _status(svc, content, ctype, tier="full"):
    r = svc.client.post("/v1/predict", content=content, headers={**_auth(svc.tokens[tier]), "Content-Type": ctype})
    return r.status_code, r.json()


def test_bad_inputs_get_the_right_4xx_and_are_audited(svc, eval_batch):
    x = eval_batch[0]
    good = png_bytes(x[0])
    nan = x[:1].numpy().copy()
    nan[0, 0, 0, 0] = np.nan
    cases = [
        (good[: len(good) // 2], "image/png", 422, "undecodable"),
        (b"hello, not an image", "image/png", 415, "unsupported_format"),
        (b"GIF89a" + b"\0" * 50, "image/png", 415, "unsupported_format"),
        (good, "text/plain", 415, "unsupported_media_type"),
        (npy_bytes(nan), "application/x-npy", 422, "not_finite"),
        (npy_bytes(np.full((1, 8, 8), np.inf, np.float32)), "application/x-npy", 422, "not_finite"),
        (npy_bytes(x[:1].numpy() * 3), "application/x-npy", 422, "out_of_range"),
        (npy_bytes(np.zeros((3, 8, 8), np.float32)), "application/x-npy", 422, "bad_shape"),
        (npy_bytes(np.zeros((1, 8, 8), np.int64)), "application/x-npy", 422, "bad_dtype"),
        (npy_bytes(np.zeros((1, 8, 8), np.float32))[:-7], "application/x-npy", 400, "undecodable"),
        (npy_bytes(np.zeros((100, 1, 8, 8), np.float32)), "application/x-npy", 413, "too_many_images"),
        (b'{"images": "nope"}', "application/json", 422, "bad_json"),
        (b'{"images": ["@@@"]}', "application/json", 400, "bad_base64"),
        (b"{not json", "application/json", 400, "bad_json"),
        (b"", "image/png", 422, "no_images") ,
    ]
    for content, ctype, status, code in cases:
        got, body = _status(svc, content, ctype)
        assert (got, body["error"]["code"]) == (status, code), (ctype, code, body)
        ErrorResponse.model_validate(body)
    rows = svc.rows("http_status >= 400")
    assert len(rows) == len(cases) and {r["error"] for r in rows} == {c[3] for c in cases}
    assert svc.client.get("/v1/health").status_code == 200  # still alive


def test_shape_of_arrays_is_named_in_the_422(svc):
    _, body = _status(svc, npy_bytes(np.zeros((3, 8, 8), np.float32)), "application/x-npy")
    assert "1x8x8" in body["error"]["message"]


def test_decompression_bomb_is_refused_before_decoding(svc):
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) < 5000
    t0 = time.perf_counter()
    got, body = _status(svc, bomb, "image/png")
    assert got == 413 and body["error"]["code"] == "too_many_pixels" and "400000000" in body["error"]["message"]
    assert time.perf_counter() - t0 < 1.0
    got, body = _status(svc, _png_header_only(3000, 3000), "image/png")  # under PIL's own bomb limit: ours refuses
    assert got == 413 and "3000x3000 = 9000000 pixels" in body["error"]["message"]
    got, body = _status(svc, npy_bytes(np.zeros((1, 3000, 3000), np.uint8))[:200], "application/x-npy")
    assert got == 413 and body["error"]["code"] == "too_many_pixels"  # from the .npy header alone


def test_body_and_image_count_limits(tmp_path, bundle, eval_batch):
    s = Svc(tmp_path, bundle, config=ServeConfig(max_body_bytes=2000, max_images=3))
    with TestClient(s.app) as c:
        s.client = c
        got, body = _status(s, b"\0" * 5000, "image/png")
        assert got == 413 and body["error"]["code"] == "body_too_large"
        files = [("file", (f"{i}.png", png_bytes(eval_batch[0][i]), "image/png")) for i in range(4)]
        r = c.post("/v1/predict", files=files, headers=_auth(s.tokens["full"]))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
        r = c.post("/v1/predict", files=files[:3], headers=_auth(s.tokens["full"]))
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_resize_policy_converts_or_refuses(tmp_path, bundle, eval_batch):
    x, _ = eval_batch
    big = torch.nn.functional.interpolate(x[:1], size=(32, 32), mode="nearest")[0]
    rgb = x[0].expand(3, 8, 8)
    s = Svc(tmp_path, bundle)
    with TestClient(s.app) as c:
        s.client = c
        r = _post_png(s, big)
        pil = Image.open(io.BytesIO(png_bytes(big))).resize((8, 8), Image.Resampling.BILINEAR)  # the documented policy
        resized = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).float().div(255)[None, None]
        assert r.status_code == 200 and r.json()["results"][0]["label"] == _answers(bundle.pipeline, resized)[0]
        assert json.loads(s.rows(f"request_id='{r.json()['request_id']}'")[0]["shape"]) == [1, 32, 32]
        r = _post_png(s, rgb)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == _answers(bundle.pipeline, quantized(x[:1]))[0]
    s2 = Svc(tmp_path / "b", bundle, config=ServeConfig(resize=False))
    with TestClient(s2.app) as c:
        s2.client = c
        r = _post_png(s2, big)
        assert r.status_code == 422 and "expected 1x8x8" in r.json()["error"]["message"]


def test_health_ready_model_metrics(svc, bundle, eval_batch):
    assert svc.client.get("/v1/health").json() == {"status": "ok"}
    r = svc.client.get("/v1/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    m = svc.client.get("/v1/model", headers=_auth(svc.tokens["label"]))
    assert m.status_code == 200 and m.json()["bundle_version"] == bundle.version
    # no detector internals (threshold_, score scale) for a non-admin key: components by kind and name only
    assert m.json()["manifest"]["components"] == [{"kind": c["kind"], "name": c["name"]}
                                                  for c in bundle.manifest["components"]]
    assert "threshold_" not in m.text and "threshold_" in json.dumps(bundle.manifest)
    assert {k: v for k, v in m.json()["manifest"].items() if k != "components"} == {
        k: v for k, v in bundle.manifest.items() if k != "components"}
    assert m.json()["manifest"]["metrics"]["pgd"]["metrics"]["robust_accuracy"]["n"] == 100
    assert m.json()["input_shape"] == [1, 8, 8] and svc.client.get("/v1/model").status_code == 401
    _post_png(svc, eval_batch[0][0], "topk")
    text = svc.client.get("/metrics", headers=_auth(svc.scraper)).text
    for needle in ('safedl_requests_total{endpoint="/v1/predict",status="200"} 1.0', "safedl_request_latency_seconds_bucket",
                   "safedl_images_predicted_total 1.0", 'safedl_tier_requests_total{tier="topk"} 1.0',
                   f'safedl_detector_score_band_total{{band=', "safedl_ready 1.0"):
        assert needle in text, needle
    schema = svc.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/health", "/v1/ready", "/v1/model"} <= set(schema["paths"])
    assert "application/x-npy" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_unwritable_audit_location_answers_503_never_unrecorded(tmp_path, bundle, eval_batch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a folder should be")
    s = Svc(tmp_path, bundle, audit=AuditStore(blocker / "audit.db"))
    with TestClient(s.app) as c:
        s.client = c
        r = _post_png(s, eval_batch[0][0])
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable" and "results" not in r.json()
        ready = c.get("/v1/ready")
        assert ready.status_code == 503 and "audit" in ready.json()["problems"][0]
    assert any("audit unavailable" in rec.getMessage() for rec in caplog.records)


def test_full_audit_database_answers_503(tmp_path, bundle, eval_batch):
    s = Svc(tmp_path, bundle, audit=AuditStore(tmp_path / "audit.db", max_bytes=64 * 1024))
    with TestClient(s.app) as c:
        s.client = c
        statuses = []
        for _ in range(300):
            statuses.append(_post_png(s, eval_batch[0][0]).status_code)
            if statuses[-1] == 503:
                break
        assert statuses[-1] == 503 and set(statuses[:-1]) == {200}
        assert c.get("/v1/ready").status_code == 503
    assert len(s.rows("http_status=200")) == statuses.count(200)  # every 200 is on record


def test_non_finite_scores_never_break_the_answer(tmp_path, bundle, eval_batch):
    """A detector returning inf/NaN (a broken component) still gives a valid JSON answer, audited."""
    class Broken:
        def __init__(self, inner):
            self.inner, self.input_shape, self.class_names = inner, inner.input_shape, inner.class_names

        def decide(self, x):
            d = self.inner.decide(x)
            scores = {k: torch.full_like(v, float("inf")) for k, v in d.detector_scores.items()}
            probs = d.probs.clone()
            probs[:, 0] = float("nan")
            return type(d)(labels=d.labels, probs=probs, rejected=d.rejected, reasons=d.reasons,
                           detector_scores=scores, thresholds=d.thresholds)

    broken = type(bundle)(path=bundle.path, manifest=bundle.manifest, pipeline=Broken(bundle.pipeline),
                          version=bundle.version)
    s = Svc(tmp_path, broken)
    with TestClient(s.app) as c:
        s.client = c
        r = _post_png(s, eval_batch[0][0])
        assert r.status_code == 200 and r.json()["results"][0]["detector_scores"][DET] is None
        assert PredictResponse.model_validate(r.json()) and len(s.rows("http_status=200")) == 1


def test_not_ready_while_the_key_store_cannot_be_read(svc, monkeypatch):
    """Defect (issue 23's note): /v1/ready checked the audit store only, so a replica whose key database was gone
    stayed in the load balancer and answered 503 to every request."""
    from safedl.serve.stores.engine import StoreUnavailable

    service = svc.app.state.service

    def gone():
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(service.keys, "list", gone)
    service.refresh_known_keys()
    r = svc.client.get("/v1/ready")
    assert r.status_code == 503 and any("key store unavailable" in p for p in r.json()["problems"])
    monkeypatch.undo()
    service.refresh_known_keys()
    assert svc.client.get("/v1/ready").status_code == 200
