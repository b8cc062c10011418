"""`safedl serve` as a real process on 127.0.0.1: end to end from the CLI, graceful shutdown, kill -9 under load
(every 200 keeps its audit row), a tampered bundle refuses to start, oversized headers."""
from __future__ import annotations

import signal
import sqlite3
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import ServerProcess, make_bundle, png_bytes, quantized  # noqa: E402
from safedl.cli import app as cli  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_model, digits_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serveproc")
    bundle = make_bundle(tiny_model, digits_splits, tmp / "b")
    res = CliRunner().invoke(cli, ["keys", "create", "--db", str(tmp / "k.db"), "--name", "ci", "--tier", "full",
                                   "--rate", "10000", "--burst", "10000"])
    assert res.exit_code == 0, res.output
    return tmp, bundle, res.stdout.strip().splitlines()[-1]


def _audit_ids(path, status=200) -> set[str]:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {r[0] for r in conn.execute("SELECT request_id FROM audit WHERE http_status=?", (status,))}
    conn.close()
    return ids


def _load(url, token, img, stop, answered, lock, n_max=400):
    with httpx.Client(timeout=10.0) as c:
        for _ in range(n_max):
            if stop.is_set():
                return
            try:
                r = c.post(url + "/v1/predict", content=img, headers={"X-API-Key": token, "Content-Type": "image/png"})
            except httpx.HTTPError:
                return  # the server went away
            with lock:
                answered.append((r.status_code, r.headers.get("x-request-id")))


def _load_threads(url, token, imgs, stop, answered, lock):
    threads = [threading.Thread(target=_load, args=(url, token, img, stop, answered, lock)) for img in imgs]
    for t in threads:
        t.start()
    return threads


def _join(threads, stop):
    stop.set()
    for t in threads:
        t.join(30)


def test_cli_serve_end_to_end_kill_9_restart_and_graceful_shutdown(setup, eval_batch):
    """One server life cycle (two starts, to keep the suite short): a PNG digit gets its label; kill -9 under load
    loses no answered request's audit row; the restarted server drains in-flight requests on SIGTERM."""
    tmp, bundle, token = setup
    b = load_bundle(bundle)
    x, y = quantized(eval_batch[0]), eval_batch[1]
    d = b.pipeline.decide(x)
    i = int(((d.labels == y) & ~d.rejected).nonzero()[0])
    audit = tmp / "audit.db"
    imgs = [png_bytes(x[j]) for j in range(6)]
    with ServerProcess(bundle, tmp / "k.db", audit) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/predict", files={"file": ("d.png", png_bytes(x[i]), "image/png")},
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == int(y[i])
        assert r.json()["bundle_version"] == b.version and "server" not in r.headers
        big = httpx.get(srv.url + "/v1/health", headers={"X-Junk": "a" * 20000}, timeout=10)
        assert big.status_code < 500
        assert httpx.get(srv.url + "/v1/health", timeout=5).status_code == 200  # still serving
        stop, lock, answered = threading.Event(), threading.Lock(), []
        threads = _load_threads(srv.url, token, imgs, stop, answered, lock)
        time.sleep(1.5)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        _join(threads, stop)
    ok = {rid for status, rid in answered if status == 200}
    assert len(ok) >= 5 and {s for s, _ in answered} == {200}
    assert ok <= _audit_ids(audit)  # the database opens cleanly (integrity_check) and every 200 is on record
    with ServerProcess(bundle, tmp / "k.db", audit) as srv:  # restart on the same audit database
        srv.wait_ready()
        stop, lock, answered = threading.Event(), threading.Lock(), []
        threads = _load_threads(srv.url, token, imgs[:4], stop, answered, lock)
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal after its graceful shutdown
        _join(threads, stop)
        logs = srv.log_records()
    ok2 = {rid for status, rid in answered if status == 200}
    assert ok2 and {s for s, _ in answered} <= {200, 503}
    assert ok2 <= _audit_ids(audit) and ok <= _audit_ids(audit)
    assert any(rec.get("event") == "stop" for rec in logs) and any(rec.get("event") == "request" for rec in logs)


def test_tampered_bundle_refuses_to_start(setup, tmp_path):
    import shutil

    tmp, bundle, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    srv = ServerProcess(bad, tmp / "k.db", tmp_path / "a.db")
    with srv:
        assert srv.proc.wait(120) == 2
        err = srv.log_text()
    assert "model.safetensors" in err and "sha256" in err
    assert not (tmp_path / "a.db").exists()
