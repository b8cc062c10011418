"""The service on PostgreSQL stores: two `safedl serve` replicas sharing one database answer, audit every request
and share one key's token bucket exactly; a PostgreSQL restart under load is answered 503 (fail closed), the
service recovers by itself, and no answered request's audit row is lost or duplicated."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from _postgres import Cluster, pg_bindir  # noqa: E402
from _serve_helpers import ServerProcess, make_bundle, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore, read_rows  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("pg-serve") / "bundle", detect=False)


def test_two_replicas_on_postgresql_answer_audit_and_share_limits(pg_cluster, bundle_dir, digits_splits):
    url = pg_cluster.database()  # keys and audit in one database, as replicas on several hosts would have them
    keys = KeyStore(url, create=True)
    _, token = keys.create(name="shared", rate_per_s=1e-6, burst=3)
    keys.close()
    img = png_bytes(digits_splits.test.x[0])
    with ServerProcess(bundle_dir, url, url) as a, ServerProcess(bundle_dir, url, url) as b:
        a.wait_ready(), b.wait_ready()
        statuses, ids = [], []
        for srv in (a, b, a, b, a, b):
            r = httpx.post(srv.url + "/v1/predict", content=img, timeout=30,
                           headers={"Content-Type": "image/png", "Authorization": f"Bearer {token}"})
            statuses.append(r.status_code)
            ids.append(r.headers["X-Request-ID"])
        assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses  # one bucket across replicas
        first = httpx.post(a.url + "/v1/predict", content=img, headers={"Content-Type": "image/png"}, timeout=30)
        assert first.status_code == 401
    rows = {r["request_id"]: r["http_status"] for r in read_rows(url)}
    assert [rows.get(i) for i in ids] == statuses  # every answer on record, with its status


def test_postgresql_restart_under_load_fails_closed_and_recovers(tiny_model, digits_splits, bundle_dir):
    cluster = Cluster(pg_bindir()).start()
    try:
        url = cluster.database()
        keys = KeyStore(url, create=True)
        _, token = keys.create(name="load", rate_per_s=1e6, burst=10**6)
        app = create_app(bundle=load_bundle(bundle_dir), keys=keys, audit=AuditStore(url), config=ServeConfig())
        img = png_bytes(digits_splits.test.x[0])
        answers: list[tuple[float, int, str]] = []
        stop = threading.Event()
        with TestClient(app) as client:
            def load() -> None:
                while not stop.is_set():
                    r = client.post("/v1/predict", content=img,
                                    headers={"Content-Type": "image/png", "Authorization": f"Bearer {token}"})
                    answers.append((time.monotonic(), r.status_code, r.headers.get("X-Request-ID", "")))

            threads = [threading.Thread(target=load) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            cluster.stop("fast")
            down = time.monotonic()  # stopped: from here until the start, nothing can be committed
            time.sleep(2.0)
            up = time.monotonic()
            cluster.start()
            deadline = up + 30
            while time.monotonic() < deadline and not any(s == 200 and t > up for t, s, _ in answers[-20:]):
                time.sleep(0.2)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(30)
        codes = Counter(s for _, s, _ in answers)
        during = Counter(s for t, s, _ in answers if down + 0.3 < t < up)
        assert set(codes) <= {200, 503}, codes  # never a 500, never an unrecorded answer
        assert during and set(during) == {503}, during
        assert any(s == 200 and t > up for t, s, _ in answers), "did not recover"
        rows = Counter(r["request_id"] for r in read_rows(url))
        answered = [i for _, s, i in answers if s == 200]
        assert all(rows[i] == 1 for i in answered), "an answered request's row is missing or duplicated"
        assert max(rows.values()) == 1
    finally:
        cluster.remove()
