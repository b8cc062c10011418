"""The slow lane (serve/slow_lane.py) and the penalties that put a client in it (serve/unauth.py).

Finding (bench/redteam_service.py, main at 40d6844): a keyless flood that ignores Retry-After, from 16 addresses,
was answered 429 cheaply but at full speed (~1,200 answers/s), and legit p99 rose 4.7-7.9x: the refusals took
the event loop. In the lane, a penalized client's connections are read at a bounded total rate."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import pytest

from safedl.errors import UserError
from safedl.serve.slow_lane import SlowLane, SlowLaneLimits
from safedl.serve.unauth import UnauthenticatedGuard


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lane_releases_in_order_at_its_rate_and_skips_closed_connections():
    async def scenario() -> tuple[list[int], list[float]]:
        lane = SlowLane(limits=SlowLaneLimits(rate_per_s=100.0, burst=2), penalized=lambda c: True)
        order, times, closed = [], [], {3}
        t0 = time.monotonic()
        done = asyncio.Event()
        for i in range(12):
            def release(i=i) -> None:
                order.append(i)
                times.append(time.monotonic() - t0)
                if len(order) == 11:
                    done.set()
            lane.hold(release, alive=lambda i=i: i not in closed)
        await asyncio.wait_for(done.wait(), 5.0)
        lane.close()
        return order, times

    order, times = asyncio.run(scenario())
    assert order == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # FIFO; the closed one took no turn
    assert times[1] < 0.05  # the burst goes at once
    assert times[-1] >= (11 - 2) / 100.0 * 0.9  # then 100 a second: 9 more need >= 90 ms


def test_lane_limits_are_validated():
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(UserError, match="slow-lane-rate"):
            SlowLaneLimits(rate_per_s=bad)
    with pytest.raises(UserError, match="max_connections_per_client"):
        SlowLaneLimits(max_connections_per_client=0)


def test_penalized_by_its_own_budget_or_by_everyone_s():
    clock = Clock()
    g = UnauthenticatedGuard(rate_per_s=1.0, burst=3, total_rate_per_s=0.1, total_burst=10, clock=clock)
    assert not g.penalized("10.0.0.1")  # no failure yet
    for _ in range(3):
        g.failed("10.0.0.1", endpoint="/v1/predict", code="unauthorized")
    assert g.penalized("10.0.0.1") and not g.penalized("10.0.0.2")
    clock.t += 1.5  # one token back: answered again, out of the lane
    assert not g.penalized("10.0.0.1")
    # a spread attack: 7 addresses, one failure each, none over its own budget; the total (10) is spent
    for i in range(7):
        g.failed(f"10.0.1.{i}", endpoint="/v1/predict", code="unauthorized")
    assert all(g.check(f"10.0.1.{i}") is None for i in range(7))  # the answers do not change (401)
    assert all(g.penalized(f"10.0.1.{i}") for i in range(7))      # but their connections go to the lane
    assert not g.penalized("10.0.0.2")                             # a client that never failed is never slowed
    clock.t += 5.0
    assert not any(g.penalized(f"10.0.1.{i}") for i in range(7))


# -- against the real server -------------------------------------------------------------------------------
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from _serve_helpers import ServerProcess, make_bundle, png_bytes  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402

WRONG = "sdl_0123456789ab_" + "x" * 43


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, digits_splits, tmp_path_factory):
    return make_bundle(tiny_model, digits_splits, tmp_path_factory.mktemp("lane") / "bundle")


class Conn:
    """One keep-alive HTTP/1.1 connection from ``source`` (a 127/8 address)."""

    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buf = b""

    def request(self, method: str, path: str, *, token: str, body: bytes = b"", ctype: str = "image/png") -> int:
        head = (f"{method} {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {token}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head_end = self.buf.index(b"\r\n\r\n") + 4
        length = int(re.search(rb"(?i)content-length: *(\d+)", self.buf[:head_end]).group(1))
        while len(self.buf) < head_end + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        status = int(self.buf[9:12])
        self.buf = self.buf[head_end + length:]
        return status

    def close(self) -> None:
        self.sock.close()


def _flood(port: int, sources: list[str], seconds: float, answered: list[int], stop: threading.Event) -> None:
    """Keyless requests over keep-alive connections, without waiting for Retry-After, for ``seconds``."""
    def worker(source: str) -> None:
        end = time.monotonic() + seconds
        conn = None
        while time.monotonic() < end and not stop.is_set() and answered[0] < 20_000:
            try:
                conn = conn or Conn(port, source, timeout=2.0)
                conn.request("GET", "/v1/model", token=WRONG)
                answered[0] += 1
            except (OSError, ConnectionError):
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in sources for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)


def _holds(srv, token: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
    m = re.search(r'safedl_connection_events_total\{event="slow_lane_holds"\} ([0-9.e+]+)', text)
    return float(m.group(1))


def test_a_keyless_flood_is_answered_at_the_lane_rate_and_legit_keys_are_served(tmp_path, bundle_dir,
                                                                                  digits_splits):
    keys = KeyStore(tmp_path / "k.db", create=True)
    legit = keys.create(name="legit", rate_per_s=1000, burst=1000)[1]
    scraper = keys.create(name="scraper", scopes=("metrics",))[1]
    png = png_bytes(digits_splits.test.x[0])
    rate, seconds, sources = 20.0, 3.0, [f"127.0.9.{i}" for i in range(1, 5)]
    with ServerProcess(bundle_dir, tmp_path / "k.db", tmp_path / "a.db", "--unauth-burst", "3", "--unauth-rate",
                       "0.01", "--slow-lane-rate", str(rate)) as srv:
        srv.wait_ready()
        answered, stop = [0], threading.Event()
        flood = threading.Thread(target=_flood, args=(srv.port, sources, seconds, answered, stop))
        flood.start()
        time.sleep(0.5)
        t = time.monotonic()
        r = httpx.post(srv.url + "/v1/predict", content=png, timeout=10,  # 127.0.0.1 never failed: not slowed
                       headers={"X-API-Key": legit, "Content-Type": "image/png"})
        legit_s = time.monotonic() - t
        flood.join(seconds + 20)
        # per-address bursts (4 x 3), the total budget's burst, the lane's burst and rate over the flood (+ slack):
        # without the lane the same flood is answered thousands of times
        bound = 4 * 3 + 100 + 10 + rate * (seconds + 1)
        assert answered[0] <= bound, answered[0]
        assert r.status_code == 200 and legit_s < 5.0

        # a keyholder behind a penalized address: held once (its new connection), then never again
        before = _holds(srv, scraper)
        conn = Conn(srv.port, sources[0])
        statuses = [conn.request("POST", "/v1/predict", token=legit, body=png) for _ in range(5)]
        conn.close()
        assert statuses == [200] * 5
        assert _holds(srv, scraper) - before == 1


def test_a_penalized_address_may_hold_few_connections(tmp_path, bundle_dir):
    """A penalized client's connections wait in the lane, so it may hold at most 8 (default) of them, not the 64 of
    any client: a few penalized addresses cannot take the server's connection slots by waiting there."""
    KeyStore(tmp_path / "k.db", create=True)
    source = "127.0.9.20"
    with ServerProcess(bundle_dir, tmp_path / "k.db", tmp_path / "a.db", "--unauth-burst", "3", "--unauth-rate",
                       "0.01") as srv:
        srv.wait_ready()
        conn = Conn(srv.port, source)
        assert [conn.request("GET", "/v1/model", token=WRONG) for _ in range(4)] == [401, 401, 401, 429]
        conn.close()
        time.sleep(0.5)  # the server has counted that connection out
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=(source, 0))
                 for _ in range(12)]
        time.sleep(1.0)
        answered = []
        for s in socks:
            s.setblocking(False)
            try:
                answered.append(s.recv(4096)[:12])
            except BlockingIOError:
                pass
            s.close()
        assert answered == [b"HTTP/1.1 429"] * 4  # the 9th to 12th; the first 8 wait (for a request head)
