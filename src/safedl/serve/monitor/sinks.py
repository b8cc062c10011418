"""Where alert notifications go: the log, a JSONL file, a webhook. ``Notifier.notify`` never blocks: the webhook
posts from its own thread (timeout, retries with exponential backoff), so a slow receiver cannot slow the service.
Outcomes are counted in ``safedl_alert_notifications_total{sink,outcome}`` (ok, retry, failed, dropped)."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from safedl.serve.monitor.config import Sinks

log = logging.getLogger("safedl.serve.monitor")
_STOP = object()


class WebhookSink:
    """POST each notification as JSON to ``url``; retry a connection error or 5xx ``retries`` times."""

    def __init__(self, *, url: str, timeout_s: float, retries: int, backoff_s: float, queue_size: int,
                 count: Callable[[str, str], None]):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self._count = count
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="safedl-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self._count("webhook", "dropped")
            log.error("webhook queue full: alert notification dropped", extra={"event": "webhook_dropped"})

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "safedl-monitor"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (operator-configured URL)
            resp.read()

    def _deliver(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            try:
                self._post(body)
                self._count("webhook", "ok")
                return
            except urllib.error.HTTPError as exc:
                err, retry = f"HTTP {exc.code}", exc.code >= 500
            except (urllib.error.URLError, OSError) as exc:
                err, retry = str(exc), True
            if not retry or attempt == self.retries:
                self._count("webhook", "failed")
                log.error("webhook %s failed after %d attempts: %s", self.url, attempt + 1, err,
                          extra={"event": "webhook_failed", "alert_id": payload["alert"]["alert_id"]})
                return
            self._count("webhook", "retry")
            time.sleep(self.backoff_s * 2 ** attempt)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._deliver(item)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)


class Notifier:
    """Fan an alert event out to the configured sinks."""

    def __init__(self, sinks: Sinks, *, count: Callable[[str, str], None]):
        self.sinks, self._count = sinks, count
        self._jsonl: Path | None = sinks.jsonl
        self._lock = threading.Lock()
        self.webhook = (WebhookSink(**sinks.webhook.model_dump(), count=count)
                        if sinks.webhook is not None else None)

    def notify(self, payload: dict[str, Any]) -> None:
        a = payload["alert"]
        if self.sinks.log:
            log.warning("alert %s %s: rule %s key %s value %.4g (%d events)", a["alert_id"], a["state"], a["rule"],
                        a["key_id"], a["value"], a["events"],
                        extra={"event": payload["event"], "alert": a})
            self._count("log", "ok")
        if self._jsonl is not None:
            try:
                with self._lock, open(self._jsonl, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(payload) + "\n")
                self._count("jsonl", "ok")
            except OSError as exc:
                self._count("jsonl", "failed")
                log.error("alert JSONL %s: %s", self._jsonl, exc, extra={"event": "jsonl_failed"})
        if self.webhook is not None:
            self.webhook.send(payload)

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
