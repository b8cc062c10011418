"""A seeded synthetic week of a `safedl serve` deployment, written through the stores' own schema (audit rows,
monitor alerts, key actions in one SQLite file), for `safedl monitor report` and the report in docs/.

Traffic: LEGIT keys send about PER_DAY requests a day each (one image; the pipeline rejects a benign image with
probability FPR); on ATTACK_DAYS an attacker key probes for about an hour (REJECT_ATTACK of its images rejected).
Each attack raises one ``key_rejection_rate`` alert a seeded delay after the attacker's first rejected image;
the monitor throttles or blocks the key seconds later, an operator blocks one by hand after minutes, one is left
unmitigated; one ``global_volume_anomaly`` alert (no key) fires on the busiest day. Every number is drawn from
``numpy.random.default_rng(seed)``; the same seed gives the same database.

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/synthetic_deployment.py --seed 0 --db /tmp/week.db
    PYTHONPATH=src /work/main/.venv/bin/python -m safedl.cli monitor report --db /tmp/week.db --days 7 \
        --until 2026-12-06 --out docs/weekly-report
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import uuid

import numpy as np
import sqlalchemy as sa

from safedl.serve.audit import AuditStore
from safedl.serve.monitor.store import AlertStore
from safedl.serve.stores import engine as engines
from safedl.serve.stores.schema import key_actions

log = logging.getLogger("bench.synthetic_deployment")
LEGIT, PER_DAY, FPR = 12, 120, 0.02
ATTACK_DAYS, REJECT_ATTACK, ATTACK_QUERIES = (1, 3, 4, 6), 0.35, 300
# how each attack ends: (actor, action, seconds from the alert) or None (not mitigated)
RESPONSES = ({"actor": "monitor", "action": "throttle", "after_s": 2.0},
             {"actor": "monitor", "action": "block", "after_s": 1.0},
             {"actor": "operator", "action": "block", "after_s": 1200.0}, None)


def _rows(rng: np.random.Generator, key: str, start: float, n: int, span_s: float, p_reject: float) -> list[dict]:
    ts = np.sort(start + rng.uniform(0, span_s, n))
    rejected = rng.random(n) < p_reject
    return [{"ts": float(t), "request_id": uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i).hex,
             "image_index": 0, "key_id": key, "client": "10.0.0.1", "endpoint": "/v1/predict", "http_status": 200,
             "tier": "rounded", "input_sha256": f"{int(rng.integers(0, 2**62)):064x}", "shape": [1, 28, 28],
             "label": int(rng.integers(0, 10)), "class_name": "x", "confidence": 0.9, "rejected": bool(r),
             "reason": "detector:feature_squeezing_detector" if r else None, "latency_ms": 5.0,
             "bundle_version": "synthetic"} for i, (t, r) in enumerate(zip(ts, rejected))]


def _alert(rule: str, key: str | None, start: float, severity: str, action: str | None) -> dict:
    return {"alert_id": uuid.uuid5(uuid.NAMESPACE_OID, f"{rule}{key}{start}").hex, "rule": rule,
            "severity": severity, "key_id": key, "state": "resolved", "started_at": start,
            "resolved_at": start + 900.0, "last_at": start + 900.0, "value": 0.35, "events": 3, "action": action,
            "metric": "rejection_rate", "threshold": 0.2, "bundle_version": "synthetic"}


def generate(db: str, *, seed: int, last_day: dt.date, days: int = 7) -> dict:
    """Write the week ending ``last_day`` (UTC) into ``db``; returns what was planted."""
    rng = np.random.default_rng(seed)
    day0 = dt.datetime.combine(last_day - dt.timedelta(days=days - 1), dt.time(), tzinfo=dt.timezone.utc).timestamp()
    audit, alerts = AuditStore(db), AlertStore(db)
    audit.start()
    planted = {"attacks": [], "rows": 0}
    actions = []
    for d in range(days):
        start = day0 + d * 86_400
        for k in range(LEGIT):
            rows = _rows(rng, f"legit{k:02d}", start, int(rng.poisson(PER_DAY)), 86_400, FPR)
            audit.submit(rows).result(60)
            planted["rows"] += len(rows)
        if d in ATTACK_DAYS:
            n = ATTACK_DAYS.index(d)
            key, t0 = f"attacker{n}", start + float(rng.uniform(3_600, 72_000))
            rows = _rows(rng, key, t0, ATTACK_QUERIES, 3_600, REJECT_ATTACK)
            audit.submit(rows).result(60)
            planted["rows"] += len(rows)
            first_flag = min(r["ts"] for r in rows if r["rejected"])
            resp = RESPONSES[n % len(RESPONSES)]
            alert_at = first_flag + float(rng.exponential(120.0))
            alerts.upsert(_alert("key_rejection_rate", key, alert_at, "high" if n % 2 else "critical",
                                 resp["action"] if resp and resp["actor"] == "monitor" else None))
            if resp is not None:
                actions.append({"key_id": key, "action": resp["action"], "actor": resp["actor"],
                                "reason": "key_rejection_rate", "alert_id": None, "params": "{}",
                                "created_at": alert_at + resp["after_s"]})
            planted["attacks"].append({"key": key, "first_flag": first_flag, "alert_at": alert_at, "response": resp})
    busiest = day0 + 2 * 86_400 + 50_000.0
    alerts.upsert(_alert("global_volume_anomaly", None, busiest, "medium", None))
    audit.close()
    alerts.close()
    eng = engines.open_engine(db, flag="--db")
    with eng.begin() as conn:
        for a in actions:
            conn.execute(sa.insert(key_actions).values(**a))
    eng.dispose()
    return planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="SQLite file to create (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last-day", default="2026-12-06", help="last UTC day of the week (ISO date)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    planted = generate(args.db, seed=args.seed, last_day=dt.date.fromisoformat(args.last_day))
    log.info("%s", json.dumps(planted, indent=1))


if __name__ == "__main__":
    main()
