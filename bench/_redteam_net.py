"""Plumbing of bench/redteam_service.py: loopback source addresses, a raw HTTP/1.1 client on asyncio, the legit
load (Apache Bench), the server's RSS and log lines. Every loop here is bounded in count and time; every socket
goes to 127.0.0.1 (sources are other 127/8 addresses, so attackers and the legit client are distinct clients)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

HOST = "127.0.0.1"


class AddressPool:
    """Fresh loopback source addresses 127.A.B.C (never 127.0.0.1, the legit client's), one block per probe."""

    def __init__(self, first_octet: int = 20):
        self.n, self.first = 0, first_octet

    def take(self, count: int) -> list[str]:
        out = []
        while len(out) < count:
            self.n += 1
            a, b, c = self.first + self.n // 64516, (self.n // 254) % 254 + 1, self.n % 254 + 1
            out.append(f"127.{a}.{b}.{c}")
        return out


def request_bytes(method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader, timeout: float = 30.0) -> tuple[int, dict, bytes] | None:
    """(status, lower-case headers, body) of one response, or None if the server closed without one."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
        return int(lines[0].split()[1]), headers, body
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.LimitOverrunError, ValueError):
        return None


async def connect(port: int, source: str, timeout: float = 10.0):
    return await asyncio.wait_for(asyncio.open_connection(HOST, port, local_addr=(source, 0), limit=1 << 20),
                                  timeout)


def close(writer) -> None:
    if writer is not None:
        try:
            writer.close()
        except (OSError, RuntimeError):
            pass


class KeepAlive:
    """One client connection that reconnects whenever the server closed it (Connection: close, EOF)."""

    def __init__(self, port: int, source: str):
        self.port, self.source = port, source
        self.reader = self.writer = None
        self.connects = 0

    async def send(self, raw: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes] | None:
        try:
            if self.writer is None:
                self.reader, self.writer = await connect(self.port, self.source)
                self.connects += 1
            self.writer.write(raw)
            await self.writer.drain()
            resp = await read_response(self.reader, timeout)
        except (OSError, TimeoutError):
            resp = None
        if resp is None or resp[1].get("connection", "").lower() == "close":
            self.drop()
        return resp

    def drop(self) -> None:
        close(self.writer)
        self.reader = self.writer = None


# -- the legit load: Apache Bench (external, C), or a Python fallback with the same summary --------------------
class Legit:
    """``ab -c C -t S`` posting one PNG with the legit key; ``stop()`` ends it early (SIGINT: ab prints what it
    has) and returns {p50_ms, p99_ms, rps, requests, non_2xx, failed}."""

    def __init__(self, port: int, token: str, png: Path, workdir: Path, *, concurrency: int = 4):
        self.port, self.token, self.png, self.workdir, self.c = port, token, png, workdir, concurrency
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.tool = "ab" if shutil.which("ab") else None

    def start(self, seconds: float) -> "Legit":
        self.runs += 1
        self.csv, self.out = self.workdir / f"ab{self.runs}.csv", self.workdir / f"ab{self.runs}.txt"
        if self.tool is None:
            self.thread = _PythonLoad(self.port, self.token, self.png.read_bytes(), self.c, seconds)
            self.thread.start()
            return self
        cmd = ["ab", "-q", "-r", "-s", "30", "-c", str(self.c), "-t", str(max(1, int(seconds))), "-n", "5000000",
               "-p", str(self.png), "-T", "image/png", "-H", f"X-API-Key: {self.token}", "-e", str(self.csv),
               "-g", str(self.csv.with_suffix(".tsv")),
               f"http://{HOST}:{self.port}/v1/predict"]
        with open(self.out, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> dict:
        if self.tool is None:
            return self.thread.finish()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return parse_ab(self.out.read_text(errors="replace"), self.csv)


def parse_ab(text: str, csv: Path) -> dict:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default

    pct, done, source = {}, int(num(r"Complete requests:\s+(\d+)")), "ab -e (0.001 ms)"
    if csv.exists() and done >= 100:
        for line in csv.read_text().splitlines()[1:]:
            p, _, t = line.partition(",")
            pct[int(p)] = float(t)
    elif csv.with_suffix(".tsv").exists():  # ab -e indexes past its samples below 50 requests: use ab -g (1 ms)
        source = "ab -g (1 ms)"
        times = sorted(float(ln.split("\t")[4]) for ln in csv.with_suffix(".tsv").read_text().splitlines()[1:]
                       if ln.count("\t") >= 4)
        pct = {p: times[min(len(times) - 1, int(p / 100 * len(times)))] for p in (50, 99)} if times else {}
    return {"tool": "ab", "requests": done, "percentiles_from": source,
            "rps": num(r"Requests per second:\s+([\d.]+)"), "p50_ms": pct.get(50), "p99_ms": pct.get(99),
            "non_2xx": int(num(r"Non-2xx responses:\s+(\d+)")),
            "failed_connect_receive_exceptions": int(sum(num(rf"{w}: (\d+)") for w in ("Connect", "Receive",
                                                                                        "Exceptions")))}


class _PythonLoad(threading.Thread):
    """The fallback when ab is missing: C keep-alive clients in one asyncio loop (steals CPU from the server)."""

    def __init__(self, port: int, token: str, png: bytes, c: int, seconds: float):
        super().__init__(daemon=True)
        self.port, self.c, self.seconds = port, c, seconds
        self.raw = request_bytes("POST", "/v1/predict", headers={"X-API-Key": token, "Content-Type": "image/png"},
                                 body=png)
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        async def client() -> None:
            conn, end = KeepAlive(self.port, HOST), time.monotonic() + self.seconds
            while time.monotonic() < end and not self.halt.is_set():
                t0 = time.perf_counter()
                r = await conn.send(self.raw)
                self.samples.append((time.perf_counter() - t0, r[0] if r else 0))
            conn.drop()

        async def all_clients() -> None:
            await asyncio.gather(*(client() for _ in range(self.c)))

        self.t0 = time.monotonic()
        asyncio.run(all_clients())
        self.wall = time.monotonic() - self.t0

    def finish(self) -> dict:
        self.halt.set()
        self.join(60)
        lat = sorted(s[0] * 1000 for s in self.samples)
        q = (lambda p: lat[min(len(lat) - 1, int(round(p * len(lat))))] if lat else None)
        return {"tool": "python-fallback", "requests": len(lat), "rps": len(lat) / max(self.wall, 1e-9),
                "p50_ms": q(0.5), "p99_ms": q(0.99), "non_2xx": sum(not 200 <= s[1] < 300 for s in self.samples),
                "failed_connect_receive_exceptions": sum(s[1] == 0 for s in self.samples)}


# -- the server process: RSS and log lines ------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None


class RssSampler(threading.Thread):
    """RSS of ``pid`` every ``every_s`` seconds until ``stop()`` (bounded by ``max_s``)."""

    def __init__(self, pid: int, *, every_s: float = 2.0, max_s: float = 7200.0):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.max_s = pid, every_s, max_s
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self.halt.is_set() and time.monotonic() < end:
            self.sample()
            self.halt.wait(self.every_s)

    def sample(self) -> float | None:
        mb = rss_mb(self.pid)
        if mb is not None:
            self.samples.append((time.monotonic(), mb))
        return mb

    def window(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb in self.samples if t0 <= t <= t1]

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class LogCounter:
    """Lines of the server's stderr by kind, read incrementally: one per authenticated request and one per bundle
    swap (the service's own record of legit work), the rest (what an attack could flood), errors/tracebacks."""

    KINDS = ("lines", "request_lines", "swap_lines", "other_lines", "error_lines")

    def __init__(self, path: Path):
        self.path, self.offset, self.counts, self.first_errors = Path(path), 0, Counter(), []
        self.other_kinds: Counter = Counter()  # (logger, message start) of the "other" lines

    def update(self) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(data)
        for line in data.decode(errors="replace").splitlines():
            self.counts["lines"] += 1
            kind = ("request_lines" if '"event": "request"' in line else
                    "swap_lines" if '"event": "bundle_swap"' in line else "other_lines")
            self.counts[kind] += 1
            if kind == "other_lines":
                self.other_kinds[_kind_of(line)] += 1
            if any(s in line for s in ('"level": "error"', '"level": "critical"', "Traceback", '"exc": ')):
                self.counts["error_lines"] += 1
                if len(self.first_errors) < 3:
                    self.first_errors.append(line[:600])
        return {k: self.counts[k] for k in self.KINDS}


def _kind_of(line: str) -> str:
    try:
        doc = json.loads(line)
        return f"{doc.get('level')} {doc.get('logger')}: {str(doc.get('msg'))[:90]}"
    except (ValueError, AttributeError):
        return line[:100]


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_marks(pid: int) -> tuple:
    """CPU seconds so far of the server ``pid``, of this process (attackers, bench), of its waited children (ab)."""
    t = os.times()
    return cpu_s(pid), time.process_time(), t.children_user + t.children_system


def cpu_delta(a: tuple, b: tuple) -> dict:
    return {k: None if x is None or y is None else round(y - x, 2)
            for k, x, y in zip(("server", "attacker_and_bench", "ab_waited"), a, b)}
