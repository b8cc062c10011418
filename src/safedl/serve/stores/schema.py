"""The tables of every store, as one SQLAlchemy MetaData (Core, no ORM). Every safedl database holds all of them
(one schema, one revision line: the key and audit stores may share one PostgreSQL database); a store uses its own.

The key database's tables: ``api_keys``, ``rate_state`` (request token bucket and daily image count per key),
``pixel_state`` (the per-key pixel budget), ``key_actions`` (the monitor's automatic responses). The audit
database's: ``audit`` (one row per request and image), ``unauthenticated`` (failures before authentication, in
aggregate), ``bundle_swaps``, ``monitor_alerts``, and the stateful query detectors' shared per-key history
(``query_history_keys``: each (detector, key)'s query count across replicas, the order of its rows;
``query_history``: one row per observed batch, its features as float16 bytes; serve/stores/history.py). The review
database's: ``review_queue`` (flagged and rejected inputs with their decision and the reviewer's label:
serve/review/store.py). The migrations (serve/stores/migrations) create exactly this;
tests/test_serve_stores.py compares the two."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY AUTOINCREMENT
AUDIT_TABLES = ("audit", "unauthenticated", "bundle_swaps", "monitor_alerts")  # what --audit-max-mb counts


def _text(name: str, nullable: bool = True, **kw) -> sa.Column:
    return sa.Column(name, sa.Text(), nullable=nullable, **kw)


def _real(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _int(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


api_keys = sa.Table(
    "api_keys", metadata, _text("key_id", False, primary_key=True), _text("name", False, unique=True),
    _text("secret_sha256", False), _text("tier", False), _text("scopes", False), _real("rate_per_s", False),
    _int("burst", False), _int("daily_quota", False), _real("created_at", False), _real("revoked_at"))
rate_state = sa.Table(
    "rate_state", metadata, _text("key_id", False, primary_key=True), _real("tokens", False), _real("updated_at", False),
    _text("day", False), _int("used", False))
pixel_state = sa.Table(
    "pixel_state", metadata, _text("key_id", False, primary_key=True), _real("tokens", False), _real("updated_at", False))
key_actions = sa.Table(
    "key_actions", metadata, sa.Column("id", SERIAL, primary_key=True, autoincrement=True), _text("key_id", False),
    _text("action", False), _text("actor", False), _text("reason", False), _text("alert_id"), _text("params", False),
    _real("created_at", False), _real("restored_at"), _text("restored_by"),
    sa.Index("key_actions_key", "key_id", "restored_at"), sqlite_autoincrement=True)

AUDIT_COLUMNS = ("ts", "request_id", "image_index", "key_id", "client", "endpoint", "http_status", "error", "tier",
                 "input_sha256", "shape", "label", "class_name", "confidence", "rejected", "reason",
                 "detector_scores", "latency_ms", "bundle_version")
_AUDIT_TYPES = {"ts": (sa.Float, False), "request_id": (sa.Text, False), "image_index": (sa.Integer, True),
                "http_status": (sa.Integer, False), "label": (sa.Integer, True), "confidence": (sa.Float, True),
                "rejected": (sa.Integer, True), "latency_ms": (sa.Float, True)}
audit = sa.Table(
    "audit", metadata, sa.Column("id", SERIAL, primary_key=True, autoincrement=True),
    *(sa.Column(c, _AUDIT_TYPES.get(c, (sa.Text, True))[0](), nullable=_AUDIT_TYPES.get(c, (sa.Text, True))[1])
      for c in AUDIT_COLUMNS),
    sa.Index("audit_ts", "ts"), sa.Index("audit_request", "request_id"), sqlite_autoincrement=True)
unauthenticated = sa.Table(
    "unauthenticated", metadata, _int("minute", False), _text("client", False), _text("endpoint", False),
    _text("code", False), _int("count", False), sa.PrimaryKeyConstraint("minute", "client", "endpoint", "code"))
SWAP_COLUMNS = ("ts", "request_id", "key_id", "trigger", "action", "outcome", "from_version", "to_version", "path",
                "detail")
bundle_swaps = sa.Table(
    "bundle_swaps", metadata, sa.Column("id", SERIAL, primary_key=True, autoincrement=True), _real("ts", False),
    _text("request_id"), _text("key_id"), _text("trigger", False), _text("action", False), _text("outcome", False),
    _text("from_version"), _text("to_version"), _text("path"), _text("detail"), sqlite_autoincrement=True)
ALERT_COLUMNS = ("alert_id", "rule", "severity", "key_id", "state", "started_at", "resolved_at", "last_at", "value",
                 "events", "action", "metric", "threshold", "bundle_version")
monitor_alerts = sa.Table(
    "monitor_alerts", metadata, _text("alert_id", False, primary_key=True), _text("rule", False), _text("severity", False),
    _text("key_id"), _text("state", False), _real("started_at", False), _real("resolved_at"),
    _real("last_at", False), _real("value"), _int("events", False), _text("action"), _text("metric", False),
    _real("threshold", False), _text("bundle_version"), sa.Index("monitor_alerts_started", "started_at"))

query_history_keys = sa.Table(
    "query_history_keys", metadata, _text("detector", False), _text("key_id", False), _int("seq", False),
    _real("updated_at", False), sa.PrimaryKeyConstraint("detector", "key_id"))
query_history = sa.Table(
    "query_history", metadata, _text("detector", False), _text("key_id", False), _int("seq", False),
    _text("writer", False), _int("n", False), _int("dim", False), sa.Column("feats", sa.LargeBinary(), nullable=False),
    _real("ts", False), sa.PrimaryKeyConstraint("detector", "key_id", "seq"), sa.Index("query_history_ts", "ts"))

REVIEW_COLUMNS = ("ts", "request_id", "image_index", "key_id", "client", "input_sha256", "shape", "label",
                  "class_name", "confidence", "rejected", "reason", "detector_scores", "bundle_version", "source",
                  "class_names", "image", "size_bytes", "review_label", "labelled_by", "labelled_at")
review_queue = sa.Table(
    "review_queue", metadata, sa.Column("id", SERIAL, primary_key=True, autoincrement=True), _real("ts", False),
    _text("request_id", False), _int("image_index", False), _text("key_id"), _text("client"),
    _text("input_sha256", False), _text("shape", False), _int("label"), _text("class_name"), _real("confidence"),
    _int("rejected", False), _text("reason"), _text("detector_scores", False), _text("bundle_version"),
    _text("source", False), _text("class_names", False), sa.Column("image", sa.LargeBinary(), nullable=False),
    _int("size_bytes", False), _text("review_label"), _text("labelled_by"), _real("labelled_at"),
    sa.UniqueConstraint("request_id", "image_index", name="review_queue_request"),
    sa.Index("review_queue_ts", "ts"), sqlite_autoincrement=True)

TABLES = tuple(metadata.tables)
