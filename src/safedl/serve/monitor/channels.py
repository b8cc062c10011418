"""What each alert channel receives: pure functions from a notification to that channel's message.

A notification is ``{"event": "alert_fired" | "alert_escalated" | "alert_resolved", "alert": {...}}`` (the alert
as ``SecurityMonitor.public`` gives it, with its ``fingerprint``); a grouped one (``routing.group_s``) also has
``"group": {"rule", "count", "keys", "alerts"}`` listing every alert it stands for. Transports live in ``sinks``.
"""
from __future__ import annotations

import json
import time
from email.message import EmailMessage
from typing import Any

#: our levels -> PagerDuty Events v2 severities (critical, error, warning, info)
PAGERDUTY_SEVERITY = {"critical": "critical", "high": "error", "medium": "warning", "warning": "warning",
                      "low": "info", "info": "info"}
_VERB = {"alert_fired": "firing", "alert_escalated": "escalated", "alert_resolved": "resolved"}


def _when(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _keys(payload: dict[str, Any]) -> list[str]:
    group = payload.get("group")
    if group:
        return [str(k) for k in group["keys"]]
    key = payload["alert"]["key_id"]
    return [] if key is None else [str(key)]


def summary(payload: dict[str, Any]) -> str:
    """One line: ``[CRITICAL] query_attack firing on key k1 (stateful_flags 7 >= 5, alert a1)``."""
    a, keys = payload["alert"], _keys(payload)
    where = ("all traffic" if not keys else f"key {keys[0]}" if len(keys) == 1
             else f"{len(keys)} keys ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    value = "" if a.get("value") is None else f"{a.get('metric', 'value')} {a['value']:.4g}"
    thr = "" if a.get("threshold") is None else f" vs threshold {a['threshold']:g}"
    return (f"[{str(a['severity']).upper()}] {a['rule']} {_VERB.get(payload['event'], payload['event'])} on "
            f"{where} ({value}{thr}, alert {a['alert_id']})")


def details(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields every channel shows, in one flat mapping."""
    a = payload["alert"]
    out = {"rule": a["rule"], "severity": a["severity"], "state": a["state"], "key": a["key_id"],
           "value": a.get("value"), "threshold": a.get("threshold"), "metric": a.get("metric"),
           "alert_id": a["alert_id"], "fingerprint": a.get("fingerprint"), "events": a.get("events"),
           "action": a.get("action"), "started_at": _when(a.get("started_at")),
           "resolved_at": _when(a.get("resolved_at"))}
    if payload.get("group"):
        out["keys"] = _keys(payload)
        out["alert_ids"] = [x["alert_id"] for x in payload["group"]["alerts"]]
    return out


def slack_message(payload: dict[str, Any], *, channel: str | None = None) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` (the notification fallback) and Block Kit ``blocks``."""
    d = details(payload)
    keys = d.get("keys") or ([] if d["key"] is None else [d["key"]])
    value = "-" if d["value"] is None else f"{d['value']:.4g}"
    fields = [("Rule", d["rule"]), ("Severity", str(d["severity"]).upper()), ("State", d["state"]),
              ("Key" if len(keys) <= 1 else f"Keys ({len(keys)})", ", ".join(f"`{k}`" for k in keys) or "global"),
              ("Value", f"{value} ({d['metric']} vs {d['threshold']:g})" if d["threshold"] is not None else value),
              ("Alert", f"`{d['alert_id']}`")]
    body: dict[str, Any] = {
        "text": summary(payload),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": summary(payload)[:150]}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"fingerprint `{d['fingerprint']}` · "
                                                                       f"started {d['started_at']}"}]},
        ],
    }
    if channel:
        body["channel"] = channel
    return body


def pagerduty_event(payload: dict[str, Any], *, routing_key: str, source: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: trigger (fired, escalated) or resolve, ``dedup_key`` = the fingerprint."""
    d = details(payload)
    if payload["event"] == "alert_resolved":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": d["fingerprint"]}
    return {"routing_key": routing_key, "event_action": "trigger", "dedup_key": d["fingerprint"],
            "payload": {"summary": summary(payload)[:1024], "severity": PAGERDUTY_SEVERITY[d["severity"]],
                        "source": source, "component": "security-monitor", "group": d["rule"],
                        "class": d["metric"], "timestamp": d["started_at"], "custom_details": d}}


def email_message(payload: dict[str, Any], *, sender: str, to: list[str], prefix: str) -> EmailMessage:
    """A plain-text e-mail: the summary as subject, every field and the raw notification in the body."""
    d = details(payload)
    msg = EmailMessage()
    msg["Subject"] = f"{prefix} {summary(payload)}"[:250]
    msg["From"], msg["To"] = sender, ", ".join(to)
    msg["X-Safedl-Fingerprint"] = str(d["fingerprint"])
    lines = [summary(payload), ""] + [f"{k:12} {v}" for k, v in d.items() if v is not None]
    msg.set_content("\n".join(lines) + "\n\n" + json.dumps(payload, indent=2, default=str) + "\n")
    return msg
