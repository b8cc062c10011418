"""deploy/nginx/safedl.conf, run: Debian's nginx (the shipped file, included by its own path) on 127.0.0.1 in front
of two ``safedl serve`` replicas that share one key and one audit database (SQLite), each trusting only nginx's
X-Forwarded-For. Every loop is bounded in count and time; everything listens on and talks to 127.0.0.1 only."""
from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _nginx import (SHIPPED, NginxProcess, check_config, directives, nginx_binary, upstream_params,  # noqa: E402
                    write_prefix)
from _serve_flags import defaults  # noqa: E402
from _serve_helpers import ServerProcess, free_port, make_bundle, png_bytes  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402

PROXY = ("--trusted-proxy", "127.0.0.1/32")


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("deploy") / "bundle")


class Stack:
    """Two replicas on one key and audit database, nginx in front; ``keys`` creates keys in that database."""

    def __init__(self, bundle, root, nginx: str):
        self.keys_db, self.audit_db = root / "k.db", root / "a.db"
        self.keys = KeyStore(self.keys_db, create=True)
        self.metrics_token = self.keys.create(name="scraper", scopes=("metrics",))[1]
        self.replicas = [ServerProcess(bundle, self.keys_db, self.audit_db, *PROXY) for _ in range(2)]
        for r in self.replicas:
            r.wait_ready()
        self.nginx = NginxProcess(nginx, root / "nginx", free_port(), [r.port for r in self.replicas]).wait_ready()

    def token(self, name: str, **limits) -> tuple[str, str]:
        key, token = self.keys.create(name=name, **limits)
        return key.key_id, token

    def answered_200(self, replica: ServerProcess) -> float:
        """The replica's own count of predict requests answered 200 (its /metrics, read directly)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(replica.url + "/metrics", headers={"X-API-Key": self.metrics_token}, timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "safedl_requests_total" and s.labels == {"endpoint": "/v1/predict", "status": "200"})

    def audit(self, sql: str, *args) -> list[tuple]:
        conn = sqlite3.connect(self.audit_db)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        self.nginx.stop()
        for r in self.replicas:
            r.__exit__(None, None, None)


@pytest.fixture(scope="module")
def stack(bundle_dir, tmp_path_factory):
    s = Stack(bundle_dir, tmp_path_factory.mktemp("stack"), nginx_binary())
    yield s
    s.close()


def _predict(client: httpx.Client, url: str, token: str, image: bytes, **headers) -> httpx.Response:
    return client.post(url + "/v1/predict", content=image, timeout=20,
                       headers={"X-API-Key": token, "Content-Type": "image/png", **headers})


@pytest.fixture(scope="module")
def image(digits_splits) -> bytes:
    return png_bytes(digits_splits.test.x[0])


def test_shipped_config_passes_nginx_t_and_a_broken_one_does_not(tmp_path):
    nginx = nginx_binary()
    shipped = check_config(nginx, write_prefix(tmp_path / "shipped"))  # safedl.d/ exactly as shipped
    assert shipped.returncode == 0, shipped.stderr
    broken = write_prefix(tmp_path / "broken", upstreams=[8001])
    (broken.parent / "safedl.d" / "upstreams.conf").write_text("server 127.0.0.1:8001 max_fails=one;\n")
    refused = check_config(nginx, broken)
    assert refused.returncode != 0 and 'invalid parameter "max_fails=one"' in refused.stderr, refused.stderr


def _size_mb(v: str) -> float:
    return float(v[:-1]) * {"k": 2**-10, "m": 1, "g": 2**10}[v[-1].lower()] if v[-1].isalpha() else float(v) / 2**20


def _seconds(v: str) -> float:
    return float(v[:-1]) * {"ms": 1e-3, "s": 1, "m": 60}.get(v[-1], 1) if v[-1].isalpha() else float(v)


def test_the_shipped_limits_are_the_service_s_defaults():
    """A flag's default changes: the nginx line that mirrors it must change too (and the proxy's idle timeouts
    toward the replicas stay below theirs, so nginx never reuses a connection a replica is closing)."""
    from safedl.serve.connection_limits import ConnectionLimits

    d, flags = directives(SHIPPED.read_text()), defaults()
    assert _size_mb(d[("server", "client_max_body_size")][0]) == flags["--max-body-mb"]
    assert _seconds(d[("server", "client_header_timeout")][0]) == flags["--header-timeout-s"]
    assert _seconds(d[("server", "client_body_timeout")][0]) == flags["--body-timeout-s"]
    assert _seconds(d[("server", "keepalive_timeout")][0]) == flags["--keepalive-s"]
    assert int(d[("server", "limit_conn")][1]) == flags["--max-connections-per-client"]
    assert _seconds(d[("upstream", "keepalive_timeout")][0]) < flags["--keepalive-s"]
    assert int(d[("upstream", "keepalive_requests")][0]) < ConnectionLimits().max_requests_per_connection
    assert _seconds(d[("location", "proxy_read_timeout")][0]) > flags["--body-timeout-s"]
    assert d[("location", "proxy_request_buffering")] == ["off"]


def _tcp_states(ports: set[int]) -> dict[str, int]:
    """Counts of ESTABLISHED ("01") and TIME_WAIT ("06") IPv4 sockets whose local port is one of ``ports``."""
    counts = {"01": 0, "06": 0}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.split(":")[1], 16) in ports and state in counts:
                counts[state] += 1
    return counts


def test_nginx_keeps_its_connections_to_the_replicas_open(stack, image):
    ports = {r.port for r in stack.replicas}
    _, token = stack.token("keepalive")
    before = _tcp_states(ports)
    with httpx.Client() as c:
        assert [_predict(c, stack.nginx.url, token, image).status_code for _ in range(20)] == [200] * 20
    after = _tcp_states(ports)
    assert after["01"] >= 2, after  # at least one idle connection to each replica is kept
    assert after["06"] - before["06"] < 5, (before, after)  # not one closed connection per request


def test_a_bad_key_is_refused_through_nginx_before_its_body_is_sent(stack):
    """proxy_request_buffering off: nginx forwards the headers at once, so the replica's 401 comes back while the
    client still holds most of a 4 MB body (buffered, nginx would wait for all of it)."""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: sdl_{'0' * 12}_{'A' * 43}\r\n"
            f"Content-Type: application/x-npy\r\nContent-Length: {4 * 2**20}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=5) as s:
        s.sendall(head + b"\0" * 65536)
        got = b""
        try:
            while b"\r\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            pass
    assert got.startswith(b"HTTP/1.1 401"), got[:200]


def test_requests_through_nginx_are_answered_by_both_replicas(stack, image):
    before = [stack.answered_200(r) for r in stack.replicas]
    _, token = stack.token("spread")
    with httpx.Client() as c:
        codes = [_predict(c, stack.nginx.url, token, image).status_code for _ in range(20)]
    assert codes == [200] * 20
    served = [stack.answered_200(r) - b for r, b in zip(stack.replicas, before)]
    assert sum(served) == 20 and min(served) >= 5, served  # round robin: about 10 each


def test_a_burst_of_5_is_exact_across_the_two_replicas(stack, image):
    key_id, token = stack.token("burst5", burst=5, rate_per_s=1e-6)
    start = threading.Barrier(20)

    def one(_: int) -> int:
        with httpx.Client() as c:
            start.wait(10)
            return _predict(c, stack.nginx.url, token, image).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = sorted(pool.map(one, range(20), timeout=60))
    assert codes == [200] * 5 + [429] * 15
    rows = stack.audit("SELECT http_status, COUNT(DISTINCT request_id) FROM audit WHERE key_id=? GROUP BY http_status", key_id)
    assert dict(rows) == {200: 5, 429: 15}


def test_the_audited_client_is_nginx_s_view_not_a_spoofed_header(stack, image):
    """The client connects from 127.0.0.2 (still loopback, not the trusted 127.0.0.1/32) and claims two other
    addresses; nginx appends 127.0.0.2, and the service must take that right-most untrusted hop. (From 127.0.0.1
    itself the client would be a trusted hop too, and the left-most claim would win: hence 127.0.0.2.)"""
    key_id, token = stack.token("spoof")
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        r = _predict(c, stack.nginx.url, token, image, **{"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    with httpx.Client() as c:
        plain = _predict(c, stack.nginx.url, token, image)
    assert (r.status_code, plain.status_code) == (200, 200)
    rows = stack.audit("SELECT DISTINCT request_id, client FROM audit WHERE key_id=?", key_id)
    assert dict(rows) == {r.headers["X-Request-ID"]: "127.0.0.2", plain.headers["X-Request-ID"]: "127.0.0.1"}


def test_a_body_over_the_limit_is_refused_by_nginx_and_one_at_it_reaches_a_replica(stack):
    """The shipped client_max_body_size equals the replicas' --max-body-mb (8, the default)."""
    _, token = stack.token("big")
    before = stack.audit("SELECT COUNT(DISTINCT request_id) FROM audit")[0][0]
    with httpx.Client() as c:
        over = c.post(stack.nginx.url + "/v1/predict", content=b"\0" * (8 * 2**20 + 1), timeout=30,
                      headers={"X-API-Key": token, "Content-Type": "application/x-npy"})
        at = c.post(stack.nginx.url + "/v1/predict", content=b"\0" * (8 * 2**20), timeout=30,
                    headers={"X-API-Key": token, "Content-Type": "application/x-npy"})
    assert over.status_code == 413 and "nginx" in over.text  # nginx's own page: no replica saw it
    assert 400 <= at.status_code < 500 and at.status_code != 413, at.text
    assert at.headers["content-type"] == "application/json"  # the replica's answer (a malformed .npy)
    assert stack.audit("SELECT COUNT(DISTINCT request_id) FROM audit")[0][0] == before + 1


def _load(url: str, token: str, image: bytes, clients: int, each: int, killed: threading.Event) -> list[tuple]:
    """``clients`` threads sending ``each`` requests one after the other: (sent after ``killed``, status, request id)."""
    results, lock = [], threading.Lock()

    def worker() -> None:
        with httpx.Client() as c:
            for _ in range(each):
                after_kill = killed.is_set()
                r = _predict(c, url, token, image)
                with lock:
                    results.append((after_kill, r.status_code, r.headers.get("X-Request-ID")))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    return results, threads


def test_a_killed_replica_is_skipped_and_every_200_has_its_audit_row(bundle_dir, tmp_path, image):
    """SIGKILL one replica after the 10th answer of 4 concurrent clients (60 requests): every request sent after it
    died is answered 200 (one in flight at the kill may get a 502). Then, once nginx's fail_timeout has passed and it
    tries the dead replica again, 10 more requests: each one nginx sends there is retried on the other
    (proxy_next_upstream), none is a 502."""
    fail_timeout = next(_seconds(p.split("=")[1]) for p in upstream_params() if p.startswith("fail_timeout="))
    s = Stack(bundle_dir, tmp_path, nginx_binary())
    try:
        key_id, token = s.token("failover", burst=1000, rate_per_s=1000.0)
        killed = threading.Event()
        results, threads = _load(s.nginx.url, token, image, 4, 15, killed)
        deadline = time.monotonic() + 60
        while len(results) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.replicas[0].proc.send_signal(signal.SIGKILL)
        s.replicas[0].proc.wait(10)
        killed.set()
        t_kill = time.monotonic()
        for t in threads:
            t.join(90)
        time.sleep(max(0.0, t_kill + fail_timeout + 1.5 - time.monotonic()))  # nginx counts whole seconds
        with httpx.Client() as c:
            later = [_predict(c, s.nginx.url, token, image) for _ in range(10)]
    finally:
        s.close()
    after = [code for after_kill, code, _ in results if after_kill]
    assert len(results) == 60 and len(after) >= 20, (len(results), len(after))
    assert after == [200] * len(after), after
    assert [r.status_code for r in later] == [200] * 10
    ok = {rid for _, code, rid in results if code == 200} | {r.headers["X-Request-ID"] for r in later}
    audited = {rid for (rid,) in s.audit("SELECT request_id FROM audit WHERE key_id=? AND http_status=200", key_id)}
    assert len(ok) >= 66 and ok <= audited, (len(ok), ok - audited, sorted(c for _, c, _ in results))
