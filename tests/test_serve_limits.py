"""Rate limits and quotas: token bucket per key, daily image quota, 429 with Retry-After, shared across threads and
separate connections (as separate worker processes would hold); the keys and audit CLI."""
from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import make_bundle, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.serve import create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.limits import RateLimiter  # noqa: E402


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_token_bucket_burst_then_rate(tmp_path):
    store = KeyStore(tmp_path / "k.db", create=True)
    key, _ = store.create(name="a", rate_per_s=2.0, burst=3)
    clock = Clock()
    lim = RateLimiter(store, clock=clock)
    assert [lim.take(key).allowed for _ in range(4)] == [True, True, True, False]
    v = lim.take(key)
    assert v.kind == "rate" and v.retry_after_s == 1
    clock.t += 0.5  # 2/s refills one token in 0.5 s
    assert lim.take(key).allowed and not lim.take(key).allowed
    clock.t += 100  # never above the burst
    assert sum(lim.take(key).allowed for _ in range(10)) == 3


def test_daily_quota_counts_images_and_resets_at_utc_midnight(tmp_path):
    store = KeyStore(tmp_path / "k.db", create=True)
    key, _ = store.create(name="a", rate_per_s=1000, burst=1000, daily_quota=5)
    clock = Clock(1_700_006_400.0 - 10)  # 10 s before a UTC midnight (1_700_006_400 is 2023-11-15T00:00Z)
    lim = RateLimiter(store, clock=clock)
    assert lim.take(key).allowed and lim.charge_images(key, images=4).allowed
    assert lim.take(key).allowed and not lim.charge_images(key, images=2).allowed
    assert lim.charge_images(key, images=1).allowed
    v = lim.take(key)
    assert not v.allowed and v.kind == "quota" and v.retry_after_s == 10
    clock.t += 11
    assert lim.take(key).allowed and lim.charge_images(key, images=5).allowed


def test_limits_hold_across_threads_and_connections(tmp_path):
    """Two stores (two connections, as two worker processes would have) and 8 threads share one bucket."""
    path = tmp_path / "k.db"
    key, _ = KeyStore(path, create=True).create(name="a", rate_per_s=1e-6, burst=25)
    limiters = [RateLimiter(KeyStore(path)), RateLimiter(KeyStore(path))]
    allowed = []
    lock = threading.Lock()

    def worker(i):
        for _ in range(10):
            ok = limiters[i % 2].take(key).allowed
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(allowed) == 80 and sum(allowed) == 25


def test_http_429_with_retry_after_and_metrics(tmp_path, tiny_model, digits_splits, eval_batch):
    keys = KeyStore(tmp_path / "k.db", create=True)
    _, slow = keys.create(name="slow", rate_per_s=0.01, burst=2)
    _, small = keys.create(name="small", rate_per_s=100, burst=100, daily_quota=3)
    _, scraper = keys.create(name="scraper", scopes=("metrics",))
    app = create_app(bundle=load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "b")), keys=keys,
                     audit=AuditStore(tmp_path / "a.db"))
    img = png_bytes(eval_batch[0][0])
    with TestClient(app) as c:
        post = lambda tok, n=1: c.post("/v1/predict", files=[("file", ("x.png", img, "image/png"))] * n,
                                       headers={"X-API-Key": tok})
        assert [post(slow).status_code for _ in range(3)] == [200, 200, 429]
        r = post(slow)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 99 and r.json()["error"]["code"] == "rate_limited"
        assert post(small, 2).status_code == 200
        r = post(small, 2)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_limited" and int(r.headers["retry-after"]) >= 1
        assert post(small, 1).status_code == 200
        text = c.get("/metrics", headers={"X-API-Key": scraper}).text
        assert 'safedl_rate_limited_total{kind="rate"} 2.0' in text and 'safedl_rate_limited_total{kind="quota"} 1.0' in text


def test_keys_and_audit_cli(tmp_path):
    run = CliRunner().invoke
    db = tmp_path / "k.db"
    r = run(cli, ["keys", "create", "--db", str(db), "--name", "ci", "--tier", "label"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("sdl_")
    assert run(cli, ["keys", "create", "--db", str(db), "--name", "ci"]).exit_code == 2  # duplicate name
    assert run(cli, ["keys", "create", "--db", str(db), "--name", "x", "--tier", "gold"]).exit_code == 2
    listed = [json.loads(line) for line in run(cli, ["keys", "list", "--db", str(db), "--json"]).stdout.splitlines()]
    assert [(k["name"], k["tier"], k["revoked"]) for k in listed] == [("ci", "label", False)]
    assert token not in run(cli, ["keys", "list", "--db", str(db)]).stdout
    keys = KeyStore(db)
    assert keys.authenticate(token) is not None
    assert run(cli, ["keys", "revoke", "ci", "--db", str(db)]).exit_code == 0
    assert keys.authenticate(token) is None
    assert run(cli, ["keys", "revoke", "nobody", "--db", str(db)]).exit_code == 2
    # audit export: the rows of a time range
    audit = tmp_path / "a.db"
    store = AuditStore(audit)
    store.start()
    store.submit([{"ts": 1_700_000_000.0, "request_id": "old", "http_status": 200},
                  {"ts": 1_800_000_000.0, "request_id": "new", "http_status": 401}]).result(10)
    store.close()
    out = tmp_path / "x.jsonl"
    r = run(cli, ["audit", "export", "--db", str(audit), "--out", str(out), "--since", "2025-01-01"])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["request_id"] for line in out.read_text().splitlines()] == ["new"]
    r = run(cli, ["audit", "export", "--db", str(audit), "--out", str(tmp_path / "x.csv"), "--until", "2025-01-01T00:00Z"])
    assert r.exit_code == 0 and (tmp_path / "x.csv").read_text().splitlines()[1].split(",")[2] == "old"
    assert run(cli, ["audit", "export", "--db", str(audit), "--out", str(out), "--since", "yesterday"]).exit_code == 2


TAKER = """
import sys
from safedl.serve.keys import KeyStore
from safedl.serve.limits import RateLimiter
store = KeyStore(sys.argv[1])
key = next(k for k in store.list() if k.name == "shared")
lim = RateLimiter(store)
print(sum(lim.take(key).allowed for _ in range(40)))
"""


def test_limits_hold_across_processes(tmp_path):
    """Two worker processes spending from one key's bucket at the same time get exactly its burst together."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "k.db"
    KeyStore(path, create=True).create(name="shared", rate_per_s=1e-6, burst=50)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    counts = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    assert sum(counts) == 50 and all(p.returncode == 0 for p in procs)
