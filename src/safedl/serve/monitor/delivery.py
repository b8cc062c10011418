"""Queued delivery, the one implementation every remote sink (webhook, Slack, PagerDuty, e-mail) runs on.

``QueuedSink.send`` never blocks: it puts the notification into a bounded queue (full: dropped and counted) and the
sink's own thread delivers it, each attempt bounded by the sink's timeout, retrying a transient failure (connection
error, HTTP 5xx or 429, SMTP 4xx) with exponential backoff. A slow or dead receiver therefore delays only its own
queue, never the service or the other sinks. Outcomes are counted per sink: ok, retry, failed, dropped.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

log = logging.getLogger("safedl.serve.monitor")
_STOP = object()


class DeliveryError(Exception):
    """One failed attempt; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


def post_json(url: str, body: dict[str, Any], *, timeout_s: float) -> bytes:
    """POST ``body`` as JSON; raises DeliveryError (retry on a connection error, a timeout, 5xx and 429)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "safedl-monitor"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (operator-configured URL)
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code}", retry=exc.code >= 500 or exc.code == 429) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(str(getattr(exc, "reason", exc)), retry=True) from None


class QueuedSink:
    """Deliver notifications with ``deliver(payload)`` from a thread of its own (see the module docstring)."""

    def __init__(self, *, name: str, deliver: Callable[[dict[str, Any]], None], retries: int, backoff_s: float,
                 queue_size: int, count: Callable[[str, str], None]):
        self.name, self.retries, self.backoff_s = name, retries, backoff_s
        self._deliver_once, self._count = deliver, count
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"safedl-sink-{name}", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> None:
        """Queue ``payload``; never blocks (a full queue drops it, counted as ``dropped``)."""
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self._count(self.name, "dropped")
            log.error("%s queue full: alert notification dropped", self.name,
                      extra={"event": "sink_dropped", "sink": self.name})

    def _deliver(self, payload: dict[str, Any]) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._deliver_once(payload)
                self._count(self.name, "ok")
                return
            except DeliveryError as exc:
                err, retry = str(exc), exc.retry
            except Exception as exc:  # a formatting bug must not kill the sink's thread
                err, retry = f"{type(exc).__name__}: {exc}", False
            if not retry or attempt == self.retries:
                self._count(self.name, "failed")
                log.error("%s delivery failed after %d attempts: %s", self.name, attempt + 1, err,
                          extra={"event": "sink_failed", "sink": self.name, "alert_id": _alert_id(payload)})
                return
            self._count(self.name, "retry")
            time.sleep(self.backoff_s * 2 ** attempt)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._deliver(item)

    def pending(self) -> int:
        """Notifications queued and not yet taken by the thread."""
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds in all), then stop the thread."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def _alert_id(payload: dict[str, Any]) -> str | None:
    alert = payload.get("alert") or (payload.get("alerts") or [{}])[0]
    return alert.get("alert_id")
