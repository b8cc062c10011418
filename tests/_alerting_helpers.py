"""Helpers of the alerting tests: a SecurityMonitor driven directly (in-memory alert and action stores, a scripted
query detector, a fake clock), an HTTP receiver and an SMTP server on 127.0.0.1 that record what they get."""
from __future__ import annotations

import json
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import torch
from prometheus_client import CollectorRegistry, generate_latest

from safedl.defenses.query.base import QueryVerdict
from safedl.serve.monitor.config import MonitorConfig
from safedl.serve.monitor.core import SecurityMonitor
from safedl.serve.monitor.metrics import MonitorMetrics
from safedl.serve.monitor.sinks import Notifier


class ScriptedDetector:
    """Flags every query of the keys in ``attacking``."""

    def __init__(self):
        self.attacking: set[str] = set()
        self.seen: dict[str, int] = {}

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict:
        before = self.seen.get(key, 0)
        self.seen[key] = before + len(x)
        if key in self.attacking:
            return QueryVerdict(True, 2.0, self.seen[key], first_at=before + 1, n_flagged=len(x))
        return QueryVerdict(False, 0.1, self.seen[key])

    def reset(self, key: str | None = None) -> None:
        self.seen.clear()


class MemAlerts:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def upsert(self, alert: dict) -> None:
        self.rows[alert["alert_id"]] = dict(alert)

    def resolve_stale(self, *, now: float) -> int:
        return 0

    def recent(self, *, since: float, limit: int = 100) -> list[dict]:
        return sorted(self.rows.values(), key=lambda a: -a["started_at"])[:limit]

    def close(self) -> None:
        pass


class MemActions:
    def __init__(self):
        self.rows: list[SimpleNamespace] = []

    def active(self, key_id: str | None = None) -> list[SimpleNamespace]:
        return [a for a in self.rows if key_id is None or a.key_id == key_id]

    def record(self, *, key_id: str, action: str, reason: str, alert_id: str | None, actor: str = "monitor",
               params: dict | None = None) -> SimpleNamespace:
        a = SimpleNamespace(key_id=key_id, action=action, reason=reason, alert_id=alert_id, params=params or {})
        self.rows.append(a)
        return a


@dataclass
class Harness:
    monitor: SecurityMonitor
    detector: ScriptedDetector
    registry: CollectorRegistry
    notifications: list[dict]
    now: list[float]

    def send(self, key: str, n: int = 1, *, name: str | None = None) -> None:
        """One predict request of ``n`` images from key ``key`` at the fake clock's time; processed before return."""
        api_key = SimpleNamespace(key_id=key, name=name or f"name-{key}", tier="score")
        x = torch.zeros(n, 1, 4, 4)
        self.monitor.observe(api_key, x, {"labels": torch.zeros(n, dtype=torch.int64),
                                          "rejected": torch.zeros(n, dtype=torch.bool), "reasons": [None] * n})
        assert self.monitor.flush(5.0)

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds
        self.monitor.tick()

    def metrics(self) -> str:
        return generate_latest(self.registry).decode()

    def events(self) -> list[tuple[str, str]]:
        return [(p["event"], p["alert"]["key_id"]) for p in self.notifications]


def make_harness(rules: list[dict], **config) -> Harness:
    """A started monitor over ``rules`` (the stateful detector scripted) whose log sink is replaced by a recorder;
    ``config`` goes into MonitorConfig (sinks, routing, ...). Close it with ``h.monitor.close()``."""
    cfg = MonitorConfig.model_validate({"rules": rules, "tick_s": 60, "gallery_size": 0,
                                        "sinks": {"log": False}, **config})
    registry, now, notifications = CollectorRegistry(), [1_000_000.0], []
    metrics = MonitorMetrics(registry)
    notifier = Notifier(cfg.sinks, count=metrics.count_notification)
    real = notifier.notify

    def record(payload: dict) -> None:
        notifications.append(payload)
        real(payload)

    notifier.notify = record  # type: ignore[method-assign]
    det = ScriptedDetector()
    mon = SecurityMonitor(config=cfg, detectors={"stateful": det}, alerts=MemAlerts(), actions=MemActions(),
                          metrics=metrics, notifier=notifier, bundle_version=lambda: "v1", clock=lambda: now[0])
    mon.start()
    return Harness(mon, det, registry, notifications, now)


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


class HttpReceiver:
    """An HTTP server on 127.0.0.1 recording each POSTed JSON body; it answers the statuses in ``script`` first
    (then 200/202), after ``delay_s`` each."""

    def __init__(self, *, script: tuple[int, ...] = (), ok: int = 200, delay_s: float = 0.0):
        self.bodies: list[dict] = []
        self.statuses: list[int] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                n = len(outer.statuses)
                status = script[n] if n < len(script) else ok
                outer.statuses.append(status)
                outer.paths.append(self.path)
                if status < 300:
                    outer.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "HttpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """A tiny SMTP server on 127.0.0.1 (socketserver): EHLO advertising AUTH PLAIN, MAIL, RCPT, DATA, QUIT. Records
    each message as ``{"from", "to", "data", "auth"}``; ``reply_data`` is the answer to the end of DATA."""

    def __init__(self, *, reply_data: str = "250 OK"):
        self.messages: list[dict] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 5

            def handle(self):
                msg = {"from": None, "to": [], "data": None, "auth": None}
                self._say("220 fake ESMTP")
                for _ in range(100):  # bounded: one short session per connection
                    line = self.rfile.readline().decode().rstrip("\r\n")
                    verb = line.split(" ", 1)[0].upper()
                    if not line or verb == "QUIT":
                        self._say("221 bye")
                        return
                    if verb in ("EHLO", "HELO"):
                        self._say("250-fake\r\n250-AUTH PLAIN\r\n250 8BITMIME")
                    elif verb == "AUTH":
                        msg["auth"] = line.split(" ", 2)[2] if line.count(" ") >= 2 else None
                        self._say("235 ok")
                    elif verb == "MAIL":
                        msg["from"] = line.split(":", 1)[1].split()[0].strip("<>")
                        self._say("250 ok")
                    elif verb == "RCPT":
                        msg["to"].append(line.split(":", 1)[1].split()[0].strip("<>"))
                        self._say("250 ok")
                    elif verb == "DATA":
                        self._say("354 go ahead")
                        lines = []
                        for _ in range(10_000):
                            raw = self.rfile.readline().decode()
                            if raw.rstrip("\r\n") == ".":
                                break
                            lines.append(raw)
                        msg["data"] = "".join(lines)
                        if reply_data.startswith("250"):
                            outer.messages.append(dict(msg))
                        self._say(reply_data)
                    else:
                        self._say("250 ok")

            def _say(self, text: str) -> None:
                self.wfile.write((text + "\r\n").encode())

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "SmtpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
