"""The data of ``safedl monitor report``: per UTC day of a period, from the audit and alert stores (and the key
actions of the key database), as one plain dict the report renders (report/ops_report.py).

Per day: ``requests`` (distinct request ids of authenticated requests, any endpoint), ``images`` (predict rows
with an image), ``blocked`` (images rejected by the pipeline: a detector, the certifier's abstention or the output
sanity check), the attack rate ``blocked / images`` with its Wilson 95% interval and n, ``flagged_keys`` (keys
with at least one rejected image that day) and ``alerts`` per rule and per severity (by the day they started).

Per alert on a key (started in the period): **time to detect** = its start minus the key's *first flag* (the
first image of that key the pipeline rejected within ``LOOKBACK_S`` before the alert; without one, the key's
first request in that span); **time to mitigate** = the first action on that key (``key_actions``: the monitor's
automatic throttle / labels_only / block or an operator's) at or after that first flag, minus the first flag; no
action: not mitigated (counted, not timed). Our own operational definitions, stated here and in the report.
"""
from __future__ import annotations

import datetime as dt
import os
import statistics
from typing import Any

import sqlalchemy as sa

from safedl.errors import UserError
from safedl.serve.audit import read_rows
from safedl.serve.stores import engine as engines
from safedl.serve.stores.schema import key_actions, monitor_alerts
from safedl.utils.stats import wilson_interval

DAY_S = 86_400.0
LOOKBACK_S = DAY_S
MAX_DAYS = 366


def period(*, days: int, until: str | None) -> tuple[float, float]:
    """[since, until): the ``days`` whole UTC days ending with ``until`` (a date, default today), inclusive."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise UserError(f"--days {days!r}: must be a whole number of days from 1 to {MAX_DAYS}")
    try:
        last = dt.date.fromisoformat(until) if until else dt.datetime.now(dt.timezone.utc).date()
    except ValueError:
        raise UserError(f"--until {until!r}: not an ISO date (e.g. 2026-12-07)") from None
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc).timestamp()
    return end - days * DAY_S, end


def _day(ts: float, since: float) -> int:
    return int((ts - since) // DAY_S)


def _audit_days(db: str | os.PathLike, since: float, until: float, n_days: int,
                alerts: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """Per-day counts from the audit rows (streamed: memory grows with keys and alerts, not rows), and per alert
    on a key its first flag (see the module's note)."""
    days = [{"requests": set(), "images": 0, "blocked": 0, "flagged_keys": set()} for _ in range(n_days)]
    watch: dict[str, list[dict]] = {}
    for a in alerts:
        if a.get("key_id"):
            watch.setdefault(a["key_id"], []).append({"id": a["alert_id"], "start": float(a["started_at"]),
                                                      "flag": None, "first": None})
    for r in read_rows(db, since=since - LOOKBACK_S, until=until):
        key, ts = r.get("key_id"), float(r["ts"])
        flagged = bool(r.get("rejected"))
        for w in watch.get(key, ()):
            if w["start"] - LOOKBACK_S <= ts <= w["start"]:
                w["first"] = ts if w["first"] is None else min(w["first"], ts)
                if flagged:
                    w["flag"] = ts if w["flag"] is None else min(w["flag"], ts)
        if ts < since or key is None:
            continue
        d = days[_day(ts, since)]
        d["requests"].add(r["request_id"])
        if r.get("image_index") is not None:
            d["images"] += 1
            if flagged:
                d["blocked"] += 1
                d["flagged_keys"].add(key)
    origins = {w["id"]: (w["flag"] if w["flag"] is not None else w["first"])
               for ws in watch.values() for w in ws if w["first"] is not None}
    return days, origins


def _select(db: str | os.PathLike, query: Any, *, what: str) -> list[dict]:
    eng = engines.open_engine(engines.parse_target(db, flag="--db"), flag="--db", pool_size=1, max_overflow=0)
    try:
        with eng.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
    except sa.exc.SQLAlchemyError as exc:
        raise UserError(f"--db {db}: cannot read {what} ({engines.first_line(exc)})") from None
    finally:
        eng.dispose()


def _timings(alerts: list[dict], actions: list[dict], origins: dict[str, float]) -> list[dict]:
    out = []
    for a in alerts:
        key, origin = a.get("key_id"), origins.get(a["alert_id"])
        if origin is None:
            continue
        acted = [float(x["created_at"]) for x in actions if x["key_id"] == key and float(x["created_at"]) >= origin]
        out.append({"alert_id": a["alert_id"], "rule": a["rule"], "key_id": key, "started_at": a["started_at"],
                    "ttd_s": max(0.0, float(a["started_at"]) - origin),
                    "ttm_s": (min(acted) - origin) if acted else None})
    return out


def weekly_data(db: str | os.PathLike, *, days: int, until: str | None = None,
                keys_db: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything the report shows for the period (see the module's note); ``keys_db``: where ``key_actions``
    live (default: ``db``, which holds them when one PostgreSQL database serves both stores)."""
    since, end = period(days=days, until=until)
    if engines.parse_target(db, flag="--db").is_sqlite and not engines.parse_target(db, flag="--db").path.is_file():
        raise UserError(f"--db {db}: no such audit database")
    t = monitor_alerts
    alerts = _select(db, sa.select(t).where(t.c.started_at >= since, t.c.started_at < end)
                     .order_by(t.c.started_at), what="the monitor alerts")
    per_day, origins = _audit_days(db, since, end, days, alerts)
    k = key_actions
    actions = _select(keys_db or db, sa.select(k.c.key_id, k.c.action, k.c.actor, k.c.created_at)
                      .where(k.c.created_at >= since - LOOKBACK_S, k.c.created_at < end), what="the key actions")
    rules = sorted({a["rule"] for a in alerts})
    rows = []
    for i, d in enumerate(per_day):
        lo, hi = wilson_interval(d["blocked"], d["images"]) if d["images"] else (None, None)
        day_alerts = [a for a in alerts if _day(float(a["started_at"]), since) == i]
        rows.append({"date": dt.datetime.fromtimestamp(since + i * DAY_S, dt.timezone.utc).date().isoformat(),
                     "requests": len(d["requests"]), "images": d["images"], "blocked": d["blocked"],
                     "attack_rate": {"value": d["blocked"] / d["images"] if d["images"] else None,
                                     "ci95": [lo, hi], "n": d["images"]},
                     "flagged_keys": len(d["flagged_keys"]),
                     "alerts": {r: sum(a["rule"] == r for a in day_alerts) for r in rules},
                     "severity": {s: sum(a["severity"] == s for a in day_alerts)
                                  for s in sorted({a["severity"] for a in alerts})}})
    timings = _timings(alerts, actions, origins)
    for tm in timings:
        tm["date"] = rows[_day(float(tm["started_at"]), since)]["date"]
    return {"since": since, "until": end, "days": rows, "rules": rules, "alerts": len(alerts),
            "timings": timings, "summary": _summary(rows, timings)}


def _summary(rows: list[dict], timings: list[dict]) -> dict[str, Any]:
    images, blocked = sum(r["images"] for r in rows), sum(r["blocked"] for r in rows)
    lo, hi = wilson_interval(blocked, images) if images else (None, None)
    ttd = [t["ttd_s"] for t in timings]
    ttm = [t["ttm_s"] for t in timings if t["ttm_s"] is not None]
    return {"requests": sum(r["requests"] for r in rows), "images": images, "blocked": blocked,
            "attack_rate": {"value": blocked / images if images else None, "ci95": [lo, hi], "n": images},
            "ttd_median_s": statistics.median(ttd) if ttd else None, "ttd_n": len(ttd),
            "ttm_median_s": statistics.median(ttm) if ttm else None, "ttm_n": len(ttm),
            "not_mitigated": len(timings) - len(ttm)}
