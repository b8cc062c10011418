"""Where alert notifications go: the log, a JSONL file, and the remote channels (webhook, Slack, PagerDuty Events
v2, e-mail over SMTP). ``Notifier.notify`` never blocks: each remote channel is a ``QueuedSink`` (delivery.py: its
own thread, bounded queue, timeout, retries with exponential backoff), so a slow or dead receiver cannot slow the
service. Outcomes are counted in ``safedl_alert_notifications_total{sink,outcome}`` (ok, retry, failed, dropped).
Secrets (a Slack URL, a PagerDuty routing key, the SMTP password) may come from environment variables named in the
config; a named variable that is not set is refused at start."""
from __future__ import annotations

import json
import logging
import os
import smtplib
import ssl
import threading
from pathlib import Path
from typing import Any, Callable

from safedl.errors import UserError
from safedl.serve.monitor.channels import email_message, pagerduty_event, slack_message, summary
from safedl.serve.monitor.config import Email, PagerDuty, Sinks, Slack, Webhook
from safedl.serve.monitor.delivery import DeliveryError, QueuedSink, post_json

log = logging.getLogger("safedl.serve.monitor")
Count = Callable[[str, str], None]


def _env(name: str, where: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UserError(f"monitor config: {where} names the environment variable {name}, which is not set")
    return value


def webhook_sink(cfg: Webhook, *, count: Count) -> QueuedSink:
    """POST each notification, as it is, to ``cfg.url``."""
    return QueuedSink(name="webhook", deliver=lambda p: post_json(cfg.url, p, timeout_s=cfg.timeout_s),
                      retries=cfg.retries, backoff_s=cfg.backoff_s, queue_size=cfg.queue_size, count=count)


def slack_sink(cfg: Slack, *, count: Count) -> QueuedSink:
    url = cfg.url or _env(cfg.url_env, "sinks.slack.url_env")
    return QueuedSink(name="slack", deliver=lambda p: post_json(url, slack_message(p, channel=cfg.channel),
                                                                timeout_s=cfg.timeout_s),
                      retries=cfg.retries, backoff_s=cfg.backoff_s, queue_size=cfg.queue_size, count=count)


def pagerduty_sink(cfg: PagerDuty, *, count: Count) -> QueuedSink:
    """One Events v2 event per alert, also for a grouped notification: each alert keeps its own ``dedup_key``, so
    it resolves on its own (PagerDuty's alert grouping merges them into one incident). Events are idempotent by
    ``dedup_key``, so a retry that re-sends a group's first events is harmless."""
    key = cfg.routing_key or _env(cfg.routing_key_env, "sinks.pagerduty.routing_key_env")

    def deliver(payload: dict[str, Any]) -> None:
        members = payload["group"]["alerts"] if payload.get("group") else [payload["alert"]]
        for alert in members:
            event = pagerduty_event({"event": payload["event"], "alert": alert}, routing_key=key, source=cfg.source)
            if payload.get("group"):
                event["payload"]["custom_details"]["group"] = {"count": payload["group"]["count"],
                                                               "keys": payload["group"]["keys"]}
            post_json(cfg.url, event, timeout_s=cfg.timeout_s)

    return QueuedSink(name="pagerduty", deliver=deliver, retries=cfg.retries, backoff_s=cfg.backoff_s,
                      queue_size=cfg.queue_size, count=count)


def send_email(cfg: Email, payload: dict[str, Any]) -> None:
    """One SMTP session per notification; 4xx answers and connection errors are retried, 5xx are not."""
    msg = email_message(payload, sender=cfg.from_, to=cfg.to, prefix=cfg.subject_prefix)
    password = os.environ.get(cfg.password_env) if cfg.password_env else None
    if cfg.username is not None and not password:
        raise DeliveryError(f"the environment variable {cfg.password_env} (sinks.email.password_env) is no longer "
                            "set", retry=False)
    try:
        with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s) as smtp:
            if cfg.starttls:  # never falls back to plain text: a server without STARTTLS fails the delivery
                smtp.starttls(context=ssl.create_default_context())
            if cfg.username is not None:
                smtp.login(cfg.username, password)
            smtp.send_message(msg)
    except smtplib.SMTPNotSupportedError as exc:
        raise DeliveryError(f"SMTP server {cfg.host}: {exc}", retry=False) from None
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"SMTP {exc.smtp_code} {exc.smtp_error!r}", retry=400 <= exc.smtp_code < 500) from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(f"SMTP recipients refused: {sorted(exc.recipients)}", retry=False) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"SMTP {type(exc).__name__}: {exc}", retry=True) from None


def email_sink(cfg: Email, *, count: Count) -> QueuedSink:
    if cfg.password_env is not None:
        _env(cfg.password_env, "sinks.email.password_env")  # refused at start, read at each login
    return QueuedSink(name="email", deliver=lambda p: send_email(cfg, p), retries=cfg.retries,
                      backoff_s=cfg.backoff_s, queue_size=cfg.queue_size, count=count)


_REMOTE = {"webhook": webhook_sink, "slack": slack_sink, "pagerduty": pagerduty_sink, "email": email_sink}


class Notifier:
    """Fan an alert notification out to the configured sinks."""

    def __init__(self, sinks: Sinks, *, count: Count):
        self.sinks, self._count = sinks, count
        self._jsonl: Path | None = sinks.jsonl
        self._lock = threading.Lock()
        self.remote: dict[str, QueuedSink] = {}
        try:
            for name, make in _REMOTE.items():
                cfg = getattr(sinks, name)
                if cfg is not None:
                    self.remote[name] = make(cfg, count=count)
        except UserError:
            self.close(timeout=1.0)
            raise

    @property
    def webhook(self) -> QueuedSink | None:
        return self.remote.get("webhook")

    def notify(self, payload: dict[str, Any]) -> None:
        a = payload["alert"]
        if self.sinks.log:
            log.warning("alert %s", summary(payload), extra={"event": payload["event"], "alert": a,
                                                             "group": payload.get("group")})
            self._count("log", "ok")
        if self._jsonl is not None:
            try:
                with self._lock, open(self._jsonl, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(payload) + "\n")
                self._count("jsonl", "ok")
            except OSError as exc:
                self._count("jsonl", "failed")
                log.error("alert JSONL %s: %s", self._jsonl, exc, extra={"event": "jsonl_failed"})
        for sink in self.remote.values():
            sink.send(payload)

    def close(self, timeout: float = 10.0) -> None:
        for sink in self.remote.values():
            sink.close(timeout)
