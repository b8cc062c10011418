"""Red-team findings that need the real server (``safedl serve`` in a child process, raw sockets on 127.0.0.1):
X-Forwarded-For trust, request framing the HTTP parser folds away, held uploads of unknown keys. Each passed on
main at 0a57e2d; every loop is bounded in count and time."""
from __future__ import annotations

import socket
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _serve_helpers import ServerProcess, make_bundle, png_bytes  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("rt-proc") / "bundle")


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        try:
            while b"\r\n\r\n" not in out or len(out) < 12:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def _clients(audit_db) -> list[str]:
    conn = sqlite3.connect(audit_db)
    rows = [r[0] for r in conn.execute("SELECT client FROM audit WHERE endpoint='/v1/predict' ORDER BY id")]
    conn.close()
    return rows


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_is_honoured_only_from_a_trusted_proxy(tmp_path, bundle_dir, digits_splits, trusted):
    """Defect: X-Forwarded-For was trusted from any loopback peer (uvicorn's default), so any local client could
    write any address into the audit log and the per-address limits."""
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="u")[1]
    extra = ["--trusted-proxy", "127.0.0.1/32"] if trusted else []
    with ServerProcess(bundle_dir, tmp_path / "k.db", tmp_path / "a.db", *extra) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/predict", content=png_bytes(digits_splits.test.x[0]), timeout=10,
                       headers={"X-API-Key": token, "Content-Type": "image/png",
                                "X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
        assert r.status_code == 200, r.text
    assert _clients(tmp_path / "a.db") == (["198.51.100.7"] if trusted else ["127.0.0.1"])


def test_ambiguous_framing_is_400_at_the_socket(tmp_path, bundle_dir, digits_splits):
    """Defect: Content-Length with Transfer-Encoding, and a repeated Content-Length, were accepted (h11 folds an
    identical repeat into one header, so the app never saw it)."""
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="u")[1]
    img = png_bytes(digits_splits.test.x[0])
    base = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {token}\r\n"
            f"Content-Type: image/png\r\n").encode()
    n = str(len(img)).encode()
    with ServerProcess(bundle_dir, tmp_path / "k.db", tmp_path / "a.db") as srv:
        srv.wait_ready()
        ok = _raw(srv.port, base + b"Content-Length: " + n + b"\r\n\r\n", img)
        assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
        dup = _raw(srv.port, base + b"Content-Length: " + n + b"\r\nContent-Length: " + n + b"\r\n\r\n", img)
        assert dup.startswith(b"HTTP/1.1 400"), dup[:200]
        listed = _raw(srv.port, base + b"Content-Length: " + n + b", " + n + b"\r\n\r\n", img)
        assert listed.startswith(b"HTTP/1.1 400"), listed[:200]
        chunked = f"{len(img):x}\r\n".encode() + img + b"\r\n0\r\n\r\n"
        both = _raw(srv.port, base + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", chunked)
        assert both.startswith(b"HTTP/1.1 400"), both[:200]
    assert len(_clients(tmp_path / "a.db")) == 1  # only the well-framed request reached the model


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_held_uploads_of_unknown_keys_are_answered_and_dropped_without_buffering(tmp_path, bundle_dir):
    """Finding 4: 30 held ~8 MB uploads of a well-formed but unknown key were read and parsed before the key was
    checked, growing the server from 425 to 823 MB."""
    KeyStore(tmp_path / "k.db", create=True)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: sdl_{'0' * 12}_{'A' * 43}\r\n"
            f"Content-Type: application/x-npy\r\nContent-Length: {8 * 2**20}\r\n\r\n").encode()
    answers, closed_after = [], []
    lock = threading.Lock()

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + b"\0" * 256 * 1024)
            t0, got = time.monotonic(), b""
            try:
                while b"\r\n\r\n" not in got:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                s.settimeout(0.2)
                for _ in range(100):  # keep sending the rest of the body: the server stops reading it
                    s.sendall(b"\0" * 65536)
            except OSError:
                pass
            with lock:
                answers.append(got[:12])
                closed_after.append(time.monotonic() - t0)

    with ServerProcess(bundle_dir, tmp_path / "k.db", tmp_path / "a.db", "--unauth-burst", "100") as srv:
        srv.wait_ready()
        before = _rss_mb(srv.proc.pid)
        threads = [threading.Thread(target=client, args=(srv.port,)) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after = _rss_mb(srv.proc.pid)
    assert answers == [b"HTTP/1.1 401"] * 30
    assert after - before < 40, (before, after)
    assert max(closed_after) < 15  # the server stopped taking the body: sends fail long before 6.5 MB more
