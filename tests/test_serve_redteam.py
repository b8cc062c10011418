"""Red-team findings against the service, in-process: one test per hole, each of which passed on main at 0a57e2d
(the service was the weak point) and is closed now. Loopback only, bounded in count and time.

Connection-level findings (slowloris, held uploads, connection limits, fd exhaustion) are in test_serve_protocol.py
and test_serve_redteam_process.py; input decoding in test_serve_fuzz.py and test_serve_decode_hardening.py."""
from __future__ import annotations

import asyncio
import os
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from _serve_helpers import audit_rows, make_bundle, npy_bytes, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_model, digits_splits, tmp_path_factory):
    return load_bundle(make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("redteam") / "bundle"))


class Svc:
    def __init__(self, tmp_path, bundle, *, config=None, audit_max_bytes=None, **limits):
        self.keys = KeyStore(tmp_path / "keys.db", create=True)
        fast = dict(rate_per_s=1000, burst=1000)
        self.full = self.keys.create(name="full", tier="full", **(limits or fast))[1]
        self.label = self.keys.create(name="label", tier="label", **fast)[1]
        self.admin = self.keys.create(name="ops", scopes=("admin",), **fast)[1]
        self.scraper = self.keys.create(name="prom", scopes=("metrics",), **fast)[1]
        self.audit_path = tmp_path / "audit.db"
        self.app = create_app(bundle=bundle, keys=self.keys, config=config or ServeConfig(),
                              audit=AuditStore(self.audit_path, max_bytes=audit_max_bytes))

    def rows(self, where: str = "1=1") -> list[dict]:
        return audit_rows(self.audit_path, where)


def _h(token: str, ctype: str | None = "image/png") -> dict:
    return {"Authorization": f"Bearer {token}", **({"Content-Type": ctype} if ctype else {})}


def test_metrics_need_a_metrics_key_and_carry_no_per_image_score(tmp_path, bundle, digits_splits):
    """Finding 1: /metrics was open and its detector-score histogram's sum moved by exactly one request's score, so
    a label-tier key recovered the scores it is not shown."""
    s = Svc(tmp_path, bundle)
    with TestClient(s.app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=_h(s.label)).status_code == 403
        before = c.get("/metrics", headers=_h(s.scraper)).text
        r = c.post("/v1/predict", content=png_bytes(digits_splits.test.x[0]), headers=_h(s.label))
        assert r.status_code == 200 and r.json()["results"][0].get("detector_scores") is None
        after = c.get("/metrics", headers=_h(s.admin)).text  # admin may scrape too
    for text in (before, after):
        assert "safedl_detector_score_sum" not in text and "safedl_detector_score_bucket" not in text
    bands = [line for line in after.splitlines() if line.startswith("safedl_detector_score_band_total")]
    assert len(bands) == 1 and bands[0].endswith(" 1.0")  # one coarse band, one count: no score to subtract


def test_keyless_flood_cannot_fill_the_audit_log_or_stop_legit_traffic(tmp_path, bundle, digits_splits):
    """Finding 3: every 401 was one audit row, unlimited; 2,776 keyless requests filled a 0.5 MB audit cap and then
    every request, legit ones too, got 503."""
    s = Svc(tmp_path, bundle, audit_max_bytes=512 * 1024)
    img = png_bytes(digits_splits.test.x[0])
    with TestClient(s.app) as c:
        statuses = [c.post("/v1/predict", content=img, headers={"Content-Type": "image/png",
                                                               "X-API-Key": f"sdl_{i:012x}_{'A' * 43}"}).status_code
                    for i in range(3000)]
        assert set(statuses[:20]) == {401} and statuses[-1] == 429  # the address's failure budget is spent
        r = c.post("/v1/predict", content=img, headers=_h(s.full))
        assert r.status_code == 200, r.text
        s.app.state.service.flush_unauthenticated()
    assert [row["http_status"] for row in s.rows()] == [200]  # no row per keyless request
    conn = sqlite3.connect(s.audit_path)
    agg = conn.execute("SELECT COUNT(*), SUM(count) FROM unauthenticated").fetchone()
    conn.close()
    assert agg[1] == 3000 and agg[0] <= 4  # (client, minute, endpoint, code): at most a few rows for 3,000


def _asgi_post(app, *, headers: list[tuple[bytes, bytes]], chunks: list[bytes], disconnect_after: int | None = None,
               stall: bool = False):
    """Drive the ASGI app directly: returns (status, body, bytes of the body the app pulled, response headers);
    ``stall``: after the chunks the client sends nothing more (and never ends the body)."""
    pulled, sent = [0], []
    queue = list(chunks)

    async def receive():
        if disconnect_after is not None and pulled[0] >= disconnect_after:
            return {"type": "http.disconnect"}
        if not queue:
            await asyncio.sleep(3600)
        chunk = queue.pop(0)
        pulled[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue) or stall or disconnect_after is not None}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled[0], dict(start["headers"])


def test_an_unknown_key_is_refused_before_its_body_is_read(tmp_path, bundle):
    """Finding 4: a well-formed but unknown key's 8 MB upload was read and parsed before the key was checked."""
    s = Svc(tmp_path, bundle)
    chunks = [b"\0" * 65536] * 128
    with TestClient(s.app):  # runs the lifespan (stores, model worker)
        for token in (f"sdl_{'0' * 12}_{'A' * 43}", s.admin):  # unknown key; a known key without the predict scope
            status, body, pulled, headers = _asgi_post(
                s.app, chunks=list(chunks), headers=[(b"content-type", b"application/x-npy"),
                                                     (b"content-length", str(65536 * 128).encode()),
                                                     (b"authorization", f"Bearer {token}".encode())])
            assert status in (401, 403) and pulled <= 64 * 1024, (status, pulled)
            assert headers[b"connection"] == b"close"  # the unread body is discarded, the connection closed


def test_a_client_gone_mid_body_is_audited_as_such(tmp_path, bundle):
    """Defect: a client disconnecting mid-body was audited as a 500 (an internal error)."""
    s = Svc(tmp_path, bundle)
    with TestClient(s.app):
        status, _, _, _ = _asgi_post(s.app, chunks=[b"\x93NUMPY"], disconnect_after=6, headers=[
            (b"content-type", b"application/x-npy"), (b"content-length", b"1000"),
            (b"authorization", f"Bearer {s.full}".encode())])
    rows = s.rows()
    assert [(r["http_status"], r["error"]) for r in rows] == [(499, "client_disconnected")]
    assert rows[0]["key_id"] == s.keys.authenticate(s.full).key_id


def test_a_stalled_body_gets_408_within_its_deadline(tmp_path, bundle):
    s = Svc(tmp_path, bundle, config=ServeConfig(body_timeout_s=1.0, body_grace_s=0.5))
    with TestClient(s.app):
        t0 = time.monotonic()
        status, body, _, headers = _asgi_post(s.app, chunks=[b"\x93NUMPY"], stall=True, headers=[
            (b"content-type", b"application/x-npy"), (b"content-length", b"100000"),
            (b"authorization", f"Bearer {s.full}".encode())])
        took = time.monotonic() - t0
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout" and took < 3.0
    assert headers[b"connection"] == b"close"


def test_a_rate_limited_key_is_limited_on_bad_bodies_and_every_endpoint(tmp_path, bundle):
    """Defects: bad-body requests from a rate-limited key were not rate limited and were audited with key_id NULL;
    /v1/model, the monitor summary and the admin endpoints were not rate limited at all."""
    s = Svc(tmp_path, bundle, rate_per_s=0.001, burst=2)
    with TestClient(s.app) as c:
        statuses = [c.post("/v1/predict", content=b"not an image", headers=_h(s.full)).status_code for _ in range(3)]
        assert statuses == [415, 415, 429] or statuses[:2] != [429, 429] and statuses[-1] == 429, statuses
        assert c.get("/v1/model", headers=_h(s.full)).status_code == 429
    key_id = s.keys.authenticate(s.full).key_id
    assert {r["key_id"] for r in s.rows()} == {key_id} and len(s.rows()) == 4
    ops = KeyStore(tmp_path / "keys.db").create(name="slow-ops", scopes=("admin",), rate_per_s=0.001, burst=1)[1]
    with TestClient(s.app) as c:
        codes = [c.post("/v1/admin/rollback", headers=_h(ops, "application/json")).status_code,
                 c.get("/v1/monitor/summary", headers=_h(ops)).status_code]
    assert codes == [409, 429]


def test_decode_cost_is_bounded_by_pixels_per_request_and_per_key(tmp_path, bundle):
    """Defect: 64 RGBA 2000x2000 PNGs in 981 KB took 3.1 s of CPU to decode: limits counted requests, not pixels."""
    import io

    buf = io.BytesIO()
    Image.new("RGBA", (2000, 2000)).save(buf, "PNG")
    png = buf.getvalue()
    s = Svc(tmp_path, bundle, config=ServeConfig(max_body_bytes=8 * 2**20))
    with TestClient(s.app) as c:
        t0 = time.monotonic()
        r = c.post("/v1/predict", files=[("file", ("x.png", png, "image/png"))] * 64, headers=_h(s.full, None))
        took = time.monotonic() - t0
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels" and took < 1.5, (r.text, took)
    small = ServeConfig(max_pixels=4_000_000, max_request_pixels=4_000_000, key_pixel_burst=8_000_000,
                        key_pixels_per_s=1.0)
    s2 = Svc(tmp_path / "b", bundle, config=small)
    with TestClient(s2.app) as c:
        codes = [c.post("/v1/predict", content=png, headers=_h(s2.full)).status_code for _ in range(3)]
        r = c.post("/v1/predict", content=png, headers=_h(s2.full))
    assert codes == [200, 200, 429] and r.json()["error"]["code"] == "pixels_limited" and int(r.headers["retry-after"]) > 1


def test_exact_routes_no_docs_and_security_headers(tmp_path, bundle):
    """Defects: a trailing slash got a 307 to whatever Host the request named; /docs loaded swagger-ui from a CDN
    on the dashboard's origin, where an admin key sits in sessionStorage."""
    s = Svc(tmp_path, bundle)
    with TestClient(s.app) as c:
        r = c.post("/v1/predict/", headers={**_h(s.full), "Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
        for resp in (r, c.get("/v1/health"), c.get("/v1/model"), c.get("/v1/model", headers=_h(s.full))):
            assert resp.headers["x-content-type-options"] == "nosniff", resp.url
            assert resp.headers["cache-control"] == "no-store" and resp.headers["x-frame-options"] == "DENY"
            assert "default-src 'none'" in resp.headers["content-security-policy"]
        assert "script-src 'self'" in c.get("/dashboard").headers["content-security-policy"]


def test_framing_ambiguity_is_refused(tmp_path, bundle, digits_splits):
    """Defect: Content-Length together with Transfer-Encoding was accepted (request smuggling behind a proxy)."""
    s = Svc(tmp_path, bundle)
    arr = npy_bytes((digits_splits.test.x[:1].numpy() * 255).astype(np.uint8))
    with TestClient(s.app):
        status, body, pulled, headers = _asgi_post(s.app, chunks=[arr], headers=[
            (b"content-type", b"application/x-npy"), (b"content-length", str(len(arr)).encode()),
            (b"transfer-encoding", b"chunked"), (b"authorization", f"Bearer {s.full}".encode())])
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_framing" and pulled == 0


def test_100_swaps_while_an_attacker_rewrites_the_bundle_never_serve_unsigned_weights(tmp_path, tiny_model,
                                                                                      digits_splits):
    """Finding 2: a signed bundle was hashed, then reopened by path to load; replacing files during
    ``POST /v1/admin/bundle`` put unsigned weights live in 6 of 40 tries."""
    import hashlib
    import hmac
    import shutil
    import threading

    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    key = b"genuine-signing-key-0123456789"
    root = make_bundle(tiny_model, digits_splits, tmp_path / "genuine")
    manifest = (root / "manifest.json").read_bytes()
    (root / "manifest.sha256").write_text(f"sha256 {hashlib.sha256(manifest).hexdigest()}\n"
                                          f"hmac-sha256 {hmac.new(key, manifest, hashlib.sha256).hexdigest()}\n")
    genuine = (root / "model.safetensors").read_bytes()
    forged = st_save({k: -v for k, v in st_load(genuine).items()})
    live = Path(shutil.copytree(root, tmp_path / "live"))
    s = Svc(tmp_path, load_bundle(root, signing_key=key))
    s.app.state.service.swapper.configure(start_path=root, signing_key=key, device="cpu")
    stop = threading.Event()

    def attacker() -> None:  # bounded: stops with the test, at most 60 s
        t_end, i = time.monotonic() + 60, 0
        while not stop.is_set() and time.monotonic() < t_end:
            tmp = live / f".w{i % 2}"
            tmp.write_bytes(forged if i % 2 else genuine)
            os.replace(tmp, live / "model.safetensors")
            i += 1

    genuine_w = {k: v for k, v in st_load(genuine).items()}
    outcomes = {"swapped": 0, "refused": 0, "unsigned_live": 0}
    t = threading.Thread(target=attacker, daemon=True)
    with TestClient(s.app) as c:
        t.start()
        try:
            for _ in range(100):
                r = c.post("/v1/admin/bundle", json={"path": str(live)}, headers=_h(s.admin, "application/json"))
                assert r.status_code in (200, 422), r.text
                if r.status_code == 422:
                    outcomes["refused"] += 1
                    continue
                outcomes["swapped"] += 1
                served = s.app.state.service.pipeline.model.state_dict()
                same = all(torch.equal(served[k], v) for k, v in genuine_w.items())
                outcomes["unsigned_live"] += 0 if same else 1
        finally:
            stop.set()
            t.join(10)
    assert outcomes["unsigned_live"] == 0 and outcomes["swapped"] + outcomes["refused"] == 100, outcomes
    assert outcomes["refused"] > 0  # the race was real: some swaps saw the forged file and were refused


def test_keyless_requests_never_reach_a_key_lookup_once_the_budget_is_spent(tmp_path, bundle, digits_splits):
    """The bench's keyless flood cost the server ~1.1 ms of CPU per request through routing and a thread hop: a
    token that cannot be a key, or an unknown key id from an address over its budget, is refused at the edge."""
    s = Svc(tmp_path, bundle, config=ServeConfig(unauth_burst=5))
    svc = s.app.state.service
    lookups = []
    real = svc.admit
    svc.admit = lambda *a, **k: lookups.append(1) or real(*a, **k)
    img = png_bytes(digits_splits.test.x[0])
    with TestClient(s.app) as c:
        post = lambda key: c.post("/v1/predict", content=img, headers={"Content-Type": "image/png", "X-API-Key": key})
        malformed = [post("not-a-key").status_code for _ in range(8)]
        unknown = [post(f"sdl_{i:012x}_{'A' * 43}").status_code for i in range(8)]
        assert malformed == [401] * 5 + [429] * 3 and unknown == [429] * 8
        assert lookups == []  # none of the 16 reached a route
        assert post(s.full).status_code == 200 and lookups == [1]  # a live key from the same address still works
        fresh = KeyStore(tmp_path / "keys.db").create(name="fresh", tier="full")[1]
        assert post(fresh).status_code == 429  # unknown at the last refresh, from an address over its budget ...
        svc.refresh_known_keys()
        assert post(fresh).status_code == 200  # ... known after the next refresh (every unauth_flush_s)
