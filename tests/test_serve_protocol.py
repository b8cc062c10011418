"""Connection-level defenses (safedl.serve.protocol) against a real uvicorn on 127.0.0.1 with raw-socket clients:
slowloris and slow bodies, per-client and overall connection limits, lingering close, the keep-alive request cap,
and descriptor exhaustion in a subprocess with RLIMIT_NOFILE=256.

``SAFEDL_TEST_PLAIN_H11=1`` serves the same tests with uvicorn's own h11 protocol: the attack tests must then fail
(that is what they are for); the unit tests and the trusted-proxy case still pass."""
from __future__ import annotations

import asyncio
import http.client
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")

from safedl.errors import UserError  # noqa: E402
from safedl.serve.connection_limits import (FILTERED_LOGGERS, RepeatFilter, Throttle, client_key,  # noqa: E402
                                            parse_networks)
from safedl.serve.protocol import ConnectionLimits, guarded_protocol, harden_process  # noqa: E402

PLAIN = os.environ.get("SAFEDL_TEST_PLAIN_H11") == "1"
HERE = Path(__file__).resolve().parent
MB = 1 << 20


async def tiny_app(scope, receive, send) -> None:
    """/deny: 401 without reading the body (keep-alive); /deny-close: the same with Connection: close;
    /upload: reads the whole body, answers 200 with its length; /hold: waits 1 s without reading the body (a slow
    key check), then 401; anything else: 200 "ok"."""
    if scope["type"] != "http":
        return
    path, body, status, extra = scope["path"], b"ok", 200, []
    if path == "/hold":
        await asyncio.sleep(1.0)
        path = "/deny-close"
    if path in ("/deny", "/deny-close"):
        status, body = 401, b"no"
        extra = [(b"connection", b"close")] if path == "/deny-close" else []
    elif path == "/upload":
        n, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            n, more = n + len(message.get("body", b"")), message.get("more_body", False)
        body = str(n).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``tiny_app`` behind the guarded protocol (or plain h11 under SAFEDL_TEST_PLAIN_H11=1) in a daemon thread."""

    def __init__(self, limits: ConnectionLimits, trusted_proxies=()):
        self.port = free_port()
        self.http = "h11" if PLAIN else guarded_protocol(limits=limits, trusted_proxies=trusted_proxies)
        config = uvicorn.Config(tiny_app, host="127.0.0.1", port=self.port, http=self.http, log_config=None,
                                lifespan="off", access_log=False, timeout_keep_alive=limits.keepalive_timeout_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def stats(self) -> dict:
        return {} if PLAIN else dict(self.http.stats)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-thread server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


def read_response(sock: socket.socket, *, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response: (status, headers with lower-case names, body by Content-Length)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf[:200]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed inside the body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def get(sock: socket.socket, path: str = "/ok", *, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return read_response(sock, timeout=timeout)


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True if the peer ends the stream (EOF or reset) within ``timeout`` s; data before that is discarded."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False
    return False


# -- units ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("header_timeout_s", 0), ("linger_s", float("inf")),
                                          ("keepalive_timeout_s", float("nan")), ("max_connections", 0),
                                          ("max_connections_per_client", 2.5), ("linger_max_bytes", True)])
def test_limits_are_validated_naming_the_field(field, value):
    with pytest.raises(UserError, match=field):
        ConnectionLimits(**{field: value})
    with pytest.raises(UserError, match="trusted_proxies"):
        guarded_protocol(limits=ConnectionLimits(), trusted_proxies=["not-a-network"])


def test_client_key_groups_ipv6_by_64_and_exempts_trusted_peers():
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_key(("192.0.2.7", 1), trusted=trusted) == "192.0.2.7"
    assert client_key(("::ffff:192.0.2.7", 1), trusted=trusted) == "192.0.2.7"
    assert client_key(("2001:db8::1", 1), trusted=trusted) == client_key(("2001:db8::ffff:2", 1), trusted=trusted)
    assert client_key(("10.1.2.3", 1), trusted=trusted) is None and client_key(None, trusted=trusted) is None


def test_repeat_filter_passes_one_line_per_interval_and_counts_the_rest():
    now = [0.0]
    filt = RepeatFilter()
    filt.throttle = Throttle(interval_s=10.0, clock=lambda: now[0])
    rec = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)  # noqa: E731
    got = [filt.filter(rec(f"socket.accept() out of system resource\nsocket: {i}")) for i in range(100)]
    assert got.count(True) == 1 and filt.filter(rec("another message"))
    now[0] = 10.5
    again = rec("socket.accept() out of system resource\nsocket: x")
    assert filt.filter(again) and "99 similar lines suppressed" in again.getMessage()


def test_harden_process_raises_the_soft_limit_and_lowers_max_connections(monkeypatch, caplog):
    import resource

    for name in FILTERED_LOGGERS:  # the filters it installs go when the test does
        monkeypatch.setattr(logging.getLogger(name), "filters", list(logging.getLogger(name).filters))
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: calls.append(limits))
    with caplog.at_level(logging.WARNING):
        assert harden_process(max_connections=100) == 100
        assert harden_process(max_connections=1024) == 512 - 96
    assert calls[0] == (512, 512) and "lowered from 1024 to 416" in caplog.text
    assert any(isinstance(f, RepeatFilter) for f in logging.getLogger("asyncio").filters)
    with pytest.raises(UserError, match="max_connections"):
        harden_process(max_connections=0)


# -- against a served app ------------------------------------------------------------------------------------------
def test_slowloris_connections_get_408_at_the_header_deadline_while_legit_requests_pass():
    limits = ConnectionLimits(header_timeout_s=1.0, linger_s=0.5)
    with Served(limits) as srv:
        socks = [srv.connect() for _ in range(50)]
        t0, head = time.monotonic(), b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 200
        sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        answered, legit, sent, next_byte = {}, None, 0, t0
        while time.monotonic() < t0 + 4.0 and len(answered) < len(socks):
            if time.monotonic() >= next_byte:  # one header byte every 0.5 s on every open connection
                for i, s in enumerate(socks):
                    if i not in answered:
                        try:
                            s.send(head[sent:sent + 1])
                        except OSError:
                            pass
                sent, next_byte = sent + 1, next_byte + 0.5
            if legit is None and time.monotonic() > t0 + 0.3:
                with srv.connect() as s:
                    legit = get(s)[0]
            for key, _ in sel.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b"<reset>"
                answered[key.data] = (time.monotonic() - t0, data)
                sel.unregister(key.fileobj)
        for s in socks:
            s.close()
        assert legit == 200
        assert len(answered) == len(socks), f"{len(socks) - len(answered)} slowloris connections still open"
        assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in answered.values())
        assert max(t for t, _ in answered.values()) < 1.0 + 1.0
        assert srv.stats["header_timeouts"] == 50


def test_the_header_deadline_restarts_at_the_end_of_each_response_on_keepalive():
    limits = ConnectionLimits(header_timeout_s=1.0, keepalive_timeout_s=5.0, linger_s=0.5)
    with Served(limits) as srv, srv.connect() as s:
        assert get(s)[0] == 200
        t0, sel = time.monotonic(), selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        for byte in b"GET /ok HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaa":  # a byte every 0.25 s: resets no deadline
            if sel.select(timeout=0.25) or time.monotonic() > t0 + 2.5:
                break
            s.sendall(bytes([byte]))
        assert read_response(s, timeout=0.5)[0] == 408
        assert time.monotonic() - t0 < 1.0 + 0.8


def test_a_body_sent_slower_than_the_body_deadline_gets_408():
    limits = ConnectionLimits(body_timeout_s=1.0, linger_s=0.5)
    with Served(limits) as srv, srv.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        for _ in range(10):  # one byte every 0.3 s for at most 3 s, until the server answers
            if sel.select(timeout=0.3):
                break
            try:
                s.sendall(b"x")
            except OSError:
                break
        status = read_response(s, timeout=1.0)[0]
        assert status == 408 and time.monotonic() - t0 < 4.0
        assert srv.stats["body_timeouts"] == 1


@pytest.mark.parametrize("trusted, want", [((), 429), (("127.0.0.0/8",), 200)], ids=["client", "trusted-proxy"])
def test_per_client_connection_limit_answers_429_unless_the_peer_is_a_trusted_proxy(trusted, want):
    limits = ConnectionLimits(max_connections_per_client=5)
    with Served(limits, trusted_proxies=trusted) as srv:
        held = [srv.connect() for _ in range(5)]
        assert [get(s)[0] for s in held] == [200] * 5
        with srv.connect() as sixth:
            status, headers, _ = get(sixth)
            assert status == want
            if want == 429:
                assert headers["retry-after"].isdigit() and headers["connection"] == "close"
                assert closed_within(sixth, 3.0)
        held.pop().close()  # a slot freed is a slot to use
        for _ in range(40):
            with srv.connect() as s:
                if get(s)[0] == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("a freed per-client slot was never reused")
        for s in held:
            s.close()
        assert srv.stats.get("refused_per_client", 0) >= (1 if want == 429 else 0)


def test_overall_connection_limit_answers_503_with_retry_after():
    limits = ConnectionLimits(max_connections=5)
    with Served(limits) as srv:
        held = [srv.connect() for _ in range(5)]
        assert [get(s)[0] for s in held] == [200] * 5
        with srv.connect() as sixth:
            status, headers, _ = get(sixth)
            assert status == 503 and headers["retry-after"].isdigit() and headers["connection"] == "close"
            assert closed_within(sixth, 3.0)
        for s in held:
            s.close()
        assert srv.stats["refused_overall"] >= 1


@pytest.mark.parametrize("path", ["/deny", "/deny-close"])
def test_unread_upload_the_client_reads_the_answer_and_the_server_stops_within_linger_s(path):
    """The app answers 401 without reading an 8 MB body; the client keeps writing (about 1.3 MB/s) in a thread."""
    limits = ConnectionLimits(linger_s=1.0, linger_max_bytes=64 * MB)
    with Served(limits) as srv, srv.connect() as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {8 * MB}\r\n\r\n".encode())
        stop, result = threading.Event(), {"sent": 0, "error_at": None}

        def write_body() -> None:
            while result["sent"] < 8 * MB and not stop.is_set():
                try:
                    s.sendall(b"x" * 65536)
                except OSError:
                    result["error_at"] = time.monotonic()
                    return
                result["sent"] += 65536
                time.sleep(0.05)

        writer = threading.Thread(target=write_body, daemon=True)
        writer.start()
        status, _, body = read_response(s, timeout=5.0)  # a reset before this raises ConnectionResetError
        answered = time.monotonic()
        writer.join(limits.linger_s + 2.0)
        stop.set()
        writer.join(2.0)
        assert (status, body) == (401, b"no")
        assert result["error_at"] is not None, f"still accepting the unread body after {result['sent']} bytes"
        assert result["error_at"] - answered < limits.linger_s + 1.0
        assert result["sent"] < 8 * MB


def test_a_body_the_app_has_not_read_is_buffered_64_kb_at_most():
    """Deliverable: a refused key's upload has at most 64 KB of its body buffered (it was 64 KB + one 64 KB read).
    The app takes 1 s before answering without reading; the client sends 4 MB as fast as the server takes it."""
    with Served(ConnectionLimits()) as srv, srv.connect() as s:
        s.sendall(f"POST /hold HTTP/1.1\r\nHost: t\r\nContent-Length: {4 * MB}\r\n\r\n".encode())
        writer = threading.Thread(target=lambda: _send_quietly(s, b"x" * (4 * MB)), daemon=True)
        writer.start()
        buffered, deadline = [], time.monotonic() + 0.8
        while time.monotonic() < deadline:
            buffered += [len(p.cycle.body) for p in list(srv.server.server_state.connections) if p.cycle]
            time.sleep(0.02)
        status, _, _ = read_response(s, timeout=5.0)
        assert status == 401
        assert 0 < max(buffered) <= 64 * 1024, max(buffered)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_a_client_that_sends_the_whole_body_before_reading_gets_the_early_answer():
    """http.client uploads 8 MB to an endpoint that answers 401 with Connection: close without reading: without a
    lingering close the upload dies with a broken pipe / reset and the client never sees the 401."""
    limits = ConnectionLimits(linger_s=2.0, linger_max_bytes=16 * MB)
    with Served(limits) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        try:
            conn.request("POST", "/deny-close", body=b"x" * (8 * MB))
            response = conn.getresponse()
            assert (response.status, response.read()) == (401, b"no")
        finally:
            conn.close()
        assert PLAIN or srv.stats["lingering_closes"] >= 1


def test_keepalive_request_cap_closes_the_connection_after_the_last_answer():
    limits = ConnectionLimits(max_requests_per_connection=3)
    with Served(limits) as srv, srv.connect() as s:
        answers = [get(s) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert [a[1].get("connection") for a in answers] == [None, None, "close"]
        assert closed_within(s, 3.0)
        assert srv.stats["requests_capped"] == 1


def test_ordinary_traffic_is_unchanged_keepalive_uploads_and_a_drained_body():
    """Passes on plain uvicorn too: the defenses must not cost legitimate clients anything. (Not pipelining:
    uvicorn 0.55's own h11 protocol drops a pipelined burst now and then, guarded or not: 2 of 8 bursts of three
    GETs on plain uvicorn here.)"""
    with Served(ConnectionLimits(linger_s=1.0)) as srv, srv.connect() as s:
        for _ in range(3):
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 200
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {MB}\r\n\r\n".encode() + b"x" * MB)
        assert read_response(s)[::2] == (200, str(MB).encode())
        s.sendall(b"POST /deny HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000)
        assert read_response(s)[0] == 401  # answered before the body was read; the rest is drained ...
        assert get(s)[0] == 200            # ... and the connection stays usable
    with Served(ConnectionLimits(linger_s=1.0, linger_max_bytes=MB)) as srv, srv.connect() as s:
        s.sendall(f"POST /deny HTTP/1.1\r\nHost: t\r\nContent-Length: {2 * MB}\r\n\r\n".encode() + b"x" * MB)
        status, headers, _ = read_response(s)  # more unread body than a keep-alive connection drains: say so
        assert (status, headers.get("connection")) == (401, None if PLAIN else "close")


def test_descriptor_exhaustion_in_a_subprocess_keeps_answering_without_a_log_flood(tmp_path):
    """RLIMIT_NOFILE=256 in the server process, 300 idle connections: the ceiling from harden_process refuses
    early, the header deadline (1 s) drops the idle ones, a legit request is answered, stderr stays short."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(HERE / "_protocol_server.py"), "--nofile", "256", *(["--plain"] if PLAIN else [])]
    with open(tmp_path / "stderr.txt", "wb") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    idle: list[socket.socket] = []
    try:
        port, max_connections = _await_port(child)
        assert PLAIN or max_connections <= 256 - 96
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # during the flood: any answer
            assert get(s, timeout=5.0)[0] in (200, 503)
        assert time.monotonic() - t0 < 5.0
        assert _eventually_200(port, until=t0 + 8.0), "no 200 after the idle connections were dropped"
    finally:
        for s in idle:
            s.close()
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
    lines = (tmp_path / "stderr.txt").read_text(errors="replace").splitlines()
    assert len(lines) < 25, "\n".join(lines[:40])


def _await_port(child: subprocess.Popen) -> tuple[int, int]:
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=20):
        raise RuntimeError("server subprocess did not start")
    line = child.stdout.readline().decode().split()
    if len(line) != 4 or line[0] != "PORT":
        raise RuntimeError(f"server subprocess said {line!r}")
    return int(line[1]), int(line[3])


def _eventually_200(port: int, *, until: float) -> bool:
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if get(s, timeout=2.0)[0] == 200:
                    return True
        except (OSError, EOFError):
            pass
        time.sleep(0.2)
    return False
