"""The per-key input cache (serve/input_cache.py): a key's repeated bytes skip decoding and nothing else (rate
limit, pixel budget, quota, monitor and audit still see the request); another key never hits it; it stays within
its bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from _serve_helpers import audit_rows, make_bundle, npy_bytes, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.decode import decode_items  # noqa: E402
from safedl.serve.input_cache import InputCache  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402

SHAPE = (1, 8, 8)


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [png_bytes(torch.rand(SHAPE, generator=g)) for _ in range(n)]


class CountingDecoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, items):
        self.calls += len(items)
        return decode_items(items, shape=SHAPE, config=ServeConfig())


def test_hits_equal_decoding_and_are_per_key():
    cache, dec = InputCache(), CountingDecoder()
    items = _items(3) + [npy_bytes(np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32))]
    ref = decode_items(items, shape=SHAPE, config=ServeConfig())
    first, hits = cache.decode("A", items, dec)
    assert hits == 0 and dec.calls == 4
    again, hits = cache.decode("A", items[::-1], dec)
    assert hits == 4 and dec.calls == 4  # nothing decoded again
    other, hits = cache.decode("B", items, dec)
    assert hits == 0 and dec.calls == 8  # another key's bytes are never found
    for got in (first, other):
        assert torch.equal(got.x, ref.x) and got.sha256 == ref.sha256 and got.shapes == ref.shapes
        assert got.raw == ref.raw
    rev = decode_items(items[::-1], shape=SHAPE, config=ServeConfig())
    assert torch.equal(again.x, rev.x) and again.sha256 == rev.sha256
    again.x.fill_(7.0)  # the batch is the request's own tensor
    assert torch.equal(cache.decode("A", items, dec)[0].x, ref.x)


def test_a_bad_item_is_refused_naming_its_place_in_the_request():
    from safedl.serve.decode import InputError

    items = _items(2) + [b"\x89PNG\r\n\x1a\n-truncated"]
    with pytest.raises(InputError) as info:
        InputCache().decode("A", items, CountingDecoder())
    with pytest.raises(InputError) as plain:
        decode_items(items, shape=SHAPE, config=ServeConfig())
    assert info.value.message.startswith("image 2") and (info.value.status, info.value.code) == (
        plain.value.status, plain.value.code)


def test_bounds_per_key_and_key_count():
    per_image = 4 * 8 * 8
    cache, dec = InputCache(max_bytes_per_key=3 * per_image, max_keys=2), CountingDecoder()
    items = _items(5)
    cache.decode("A", items, dec)
    assert cache.nbytes == 3 * per_image  # the 3 most recent of A's 5
    assert cache.decode("A", items[2:], dec)[1] == 3 and cache.decode("A", items[:1], dec)[1] == 0
    cache.decode("B", items[:1], dec)
    cache.decode("C", items[:1], dec)  # a third key: A (least recently used) goes as a whole
    assert cache.decode("A", items[4:], dec)[1] == 0
    assert cache.nbytes <= 2 * 3 * per_image


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("cache") / "b")


class Recorder:
    misinformation_tau = None  # answers unchanged: the test compares a hit's answer with a miss's

    def __init__(self):
        self.seen = []

    def observe(self, key, x, d, **kw):
        self.seen.append((key.key_id, kw.get("input_sha256")))

    def __getattr__(self, name):  # the service's other monitor calls are not what this test is about
        return lambda *a, **k: None


def _app(tmp_path, bundle_dir, config, **key):
    keys = KeyStore(tmp_path / "k.db", create=True)
    a = keys.create(name="a", tier="full", **{"rate_per_s": 1000, "burst": 1000, **key})[1]
    b = keys.create(name="b", tier="full", rate_per_s=1000, burst=1000)[1]
    scraper = keys.create(name="m", scopes=("metrics",), rate_per_s=1000, burst=1000)[1]
    app = create_app(bundle=load_bundle(bundle_dir), keys=keys, audit=AuditStore(tmp_path / "a.db"), config=config)
    return app, a, b, scraper


def _post(client, token, data):
    return client.post("/v1/predict", files={"file": ("x.png", data, "image/png")},
                       headers={"Authorization": f"Bearer {token}"})


def _metric(client, scraper, outcome):
    text = client.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
    line = [ln for ln in text.splitlines() if ln.startswith(f'safedl_input_cache_total{{outcome="{outcome}"}}')]
    return float(line[0].split()[-1]) if line else 0.0


def test_a_hit_is_answered_monitored_and_audited_like_a_miss(tmp_path, bundle_dir, digits_splits):
    app, a, b, scraper = _app(tmp_path, bundle_dir, ServeConfig())
    img = png_bytes(digits_splits.test.x[0])
    with TestClient(app) as client:
        rec = app.state.service.monitor = Recorder()
        r1, r2, r3 = _post(client, a, img), _post(client, a, img), _post(client, b, img)
        assert (_metric(client, scraper, "hit"), _metric(client, scraper, "miss")) == (1.0, 2.0)
    bodies = [r.json()["results"] for r in (r1, r2, r3)]
    assert all(r.status_code == 200 for r in (r1, r2, r3)) and bodies[0] == bodies[1] == bodies[2]
    assert len(rec.seen) == 3 and rec.seen[0][1] == rec.seen[1][1]
    rows = audit_rows(tmp_path / "a.db", "endpoint = '/v1/predict'")
    assert len(rows) == 3 and len({x["input_sha256"] for x in rows}) == 1


@pytest.mark.parametrize("limit, code", [({"burst": 2, "rate_per_s": 1e-6}, "rate_limited"),
                                         ({"daily_quota": 2}, "quota_limited"),
                                         ("pixels", "pixels_limited")])
def test_a_hit_still_counts_toward_every_limit(tmp_path, bundle_dir, digits_splits, limit, code):
    # pixels: a budget of 2 requests of one 8 x 8 image (burst 128 pixels, refilled 1e-6 a second)
    config = ServeConfig(key_pixels_per_s=1e-6, key_pixel_burst=128, max_request_pixels=128, max_pixels=64) \
        if limit == "pixels" else ServeConfig()
    app, a, _, scraper = _app(tmp_path, bundle_dir, config, **({} if limit == "pixels" else limit))
    img = png_bytes(digits_splits.test.x[0])
    with TestClient(app) as client:
        statuses = [_post(client, a, img).status_code for _ in range(3)]
        hits = _metric(client, scraper, "hit")
    last = audit_rows(tmp_path / "a.db", "endpoint = '/v1/predict'")[-1]
    assert statuses[-1] == 429 and last["error"] == code and hits >= 1, (statuses, last["error"], hits)
