"""The initial schema: the tables of the SQLite-only version of the stores, for SQLite and PostgreSQL.

A database that version wrote (the same tables, no revision) is adopted by ``safedl db upgrade``: a table that
exists already is kept as it is (same columns), the missing ones are created, and the revision is recorded.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
AUDIT = [("ts", sa.Float, False), ("request_id", sa.Text, False), ("image_index", sa.Integer, True),
         ("key_id", sa.Text, True), ("client", sa.Text, True), ("endpoint", sa.Text, True),
         ("http_status", sa.Integer, False), ("error", sa.Text, True), ("tier", sa.Text, True),
         ("input_sha256", sa.Text, True), ("shape", sa.Text, True), ("label", sa.Integer, True),
         ("class_name", sa.Text, True), ("confidence", sa.Float, True), ("rejected", sa.Integer, True),
         ("reason", sa.Text, True), ("detector_scores", sa.Text, True), ("latency_ms", sa.Float, True),
         ("bundle_version", sa.Text, True)]


def _t(name: str, nullable: bool = True, **kw) -> sa.Column:
    return sa.Column(name, sa.Text(), nullable=nullable, **kw)


def _f(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _i(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def _id() -> sa.Column:
    return sa.Column("id", SERIAL, primary_key=True, autoincrement=True)


def _tables() -> dict[str, tuple[list, list]]:
    """name -> (columns and constraints, [(index name, columns)])."""
    return {
        "api_keys": ([_t("key_id", False, primary_key=True), _t("name", False, unique=True), _t("secret_sha256", False),
                      _t("tier", False), _t("scopes", False), _f("rate_per_s", False), _i("burst", False),
                      _i("daily_quota", False), _f("created_at", False), _f("revoked_at")], []),
        "rate_state": ([_t("key_id", False, primary_key=True), _f("tokens", False), _f("updated_at", False),
                        _t("day", False), _i("used", False)], []),
        "pixel_state": ([_t("key_id", False, primary_key=True), _f("tokens", False), _f("updated_at", False)], []),
        "key_actions": ([_id(), _t("key_id", False), _t("action", False), _t("actor", False), _t("reason", False),
                         _t("alert_id"), _t("params", False), _f("created_at", False), _f("restored_at"),
                         _t("restored_by")], [("key_actions_key", ["key_id", "restored_at"])]),
        "audit": ([_id(), *(sa.Column(c, t(), nullable=n) for c, t, n in AUDIT)],
                  [("audit_ts", ["ts"]), ("audit_request", ["request_id"])]),
        "unauthenticated": ([_i("minute", False), _t("client", False), _t("endpoint", False), _t("code", False),
                             _i("count", False), sa.PrimaryKeyConstraint("minute", "client", "endpoint", "code")],
                            []),
        "bundle_swaps": ([_id(), _f("ts", False), _t("request_id"), _t("key_id"), _t("trigger", False),
                          _t("action", False), _t("outcome", False), _t("from_version"), _t("to_version"),
                          _t("path"), _t("detail")], []),
        "monitor_alerts": ([_t("alert_id", False, primary_key=True), _t("rule", False), _t("severity", False),
                            _t("key_id"), _t("state", False), _f("started_at", False), _f("resolved_at"),
                            _f("last_at", False), _f("value"), _i("events", False), _t("action"),
                            _t("metric", False), _f("threshold", False), _t("bundle_version")],
                           [("monitor_alerts_started", ["started_at"])]),
    }


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, (columns, indexes) in _tables().items():
        if name in existing:  # written by the SQLite-only version: kept as it is
            continue
        serial = any(getattr(c, "name", None) == "id" for c in columns)
        op.create_table(name, *columns, **({"sqlite_autoincrement": True} if serial else {}))
        for index, cols in indexes:
            op.create_index(index, name, cols)


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
