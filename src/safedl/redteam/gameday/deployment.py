"""The game day's local deployment: ``safedl serve`` in a child process on 127.0.0.1, with its own key and audit
databases, the shipped monitor rules (thresholds from ``safedl monitor calibrate``) and a JSONL alert sink the game
day reads; stopped (SIGTERM, then SIGKILL) whatever happens."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from safedl.errors import UserError
from safedl.serve.client import ServiceClient
from safedl.serve.keys import KeyStore
from safedl.serve.monitor.config import DEFAULT_RULES

log = logging.getLogger("safedl.redteam.gameday")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _safedl(*args: str) -> list[str]:
    return [sys.executable, "-m", "safedl.cli", *args]


def write_monitor_config(workdir: Path, *, calibration: Path | None, thresholds: dict[str, Any] | None) -> Path:
    """The shipped monitor config with its JSONL sink in ``workdir``; calibration file or explicit thresholds."""
    cfg = yaml.safe_load(DEFAULT_RULES.read_text(encoding="utf-8"))
    cfg["sinks"] = {"log": True, "jsonl": str(workdir / "alerts.jsonl")}
    cfg["calibration"] = None if calibration is None else str(calibration)
    for name, params in (thresholds or {}).items():
        cfg["detectors"][name] = {**cfg["detectors"].get(name, {}), **params}
    path = workdir / "monitor.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class LocalDeployment:
    """``safedl serve BUNDLE`` with ``workers`` worker processes, keys ``user`` (tier full), ``label`` (tier label),
    ``admin`` and ``scraper`` (scope metrics); ``workdir`` holds everything it writes."""

    def __init__(self, bundle: Path, workdir: Path, *, monitor_config: Path, workers: int = 1,
                 rate_per_s: float = 2000.0):
        self.bundle, self.workdir, self.workers = Path(bundle), Path(workdir), int(workers)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        keys = KeyStore(self.workdir / "keys.db", create=True)
        self.tokens = {}
        for name, tier, scopes in (("user", "full", ("predict", "model")), ("label", "label", ("predict", "model")),
                                   ("admin", "full", ("predict", "model", "admin")), ("scraper", "full", ("metrics",))):
            self.tokens[name] = keys.create(name=name, tier=tier, scopes=scopes, rate_per_s=rate_per_s,
                                            burst=int(rate_per_s), daily_quota=10_000_000)[1]
        keys.close()
        self.cmd = _safedl("serve", str(self.bundle), "--keys", str(self.workdir / "keys.db"), "--audit",
                           str(self.workdir / "audit.db"), "--port", str(self.port), "--workers", str(self.workers),
                           "--monitor-config", str(monitor_config), "--unauth-rate", "20", "--unauth-burst", "20")
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 120.0) -> "LocalDeployment":
        self._log = open(self.workdir / "serve.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self._log, env=dict(os.environ))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"safedl serve exited with {self.proc.returncode}: "
                                f"{(self.workdir / 'serve.log').read_text(errors='replace')[-1500:]}")
            if self.ready() and self.serving_workers() >= self.workers:
                return self
            time.sleep(0.2)
        raise UserError(f"safedl serve did not become ready within {timeout_s:g} s (log: {self.workdir}/serve.log)")

    def serving_workers(self) -> int:
        """Workers the supervisor has logged as serving (1 for a single process, which serves once ready)."""
        if self.workers <= 1:
            return 1
        return (self.workdir / "serve.log").read_text(errors="replace").count('"event": "worker_ready"')

    def ready(self) -> bool:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v1/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def client(self, name: str = "user") -> ServiceClient:
        return ServiceClient(self.url, token=self.tokens[name], max_retry_wait_s=2.0)

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """The service's /metrics samples by (name, sorted labels)."""
        text = _metrics_text(self.client("scraper"))
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert the monitor's JSONL sink has notified so far (its ``alert`` objects)."""
        path = self.workdir / "alerts.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r["alert"] if isinstance(r.get("alert"), dict) else r for r in rows]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> "LocalDeployment":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _metrics_text(client: ServiceClient) -> str:
    import http.client

    conn = http.client.HTTPConnection(client.host, client.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {client.token}"})
        resp = conn.getresponse()
        return resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()
