"""Audit retention in days (``safedl serve --audit-retention-days N``): rows older than N days are deleted from the
audit tables in bounded batches, next to the size cap (``--audit-max-mb``).

Deletion never races an insert: a batch runs in the audit writer's own thread, under the lock that serializes its
commits (serve/audit.py), so no group commit of this process is in flight meanwhile; it deletes only rows whose
time is before ``now - N days`` (a row being inserted carries the time of its request, seconds old), and it deletes
by primary key from a bounded ``SELECT ... LIMIT`` so it holds its transaction for one batch only. On PostgreSQL,
where replicas share the tables, one replica purges at a time (``pg_try_advisory_xact_lock``; another replica's
inserts are never blocked, they touch other rows). ``monitor_alerts`` loses only resolved alerts (a firing one is
kept whatever its age), ``unauthenticated`` its whole minutes before the cut-off.
"""
from __future__ import annotations

from dataclasses import dataclass

from safedl.errors import UserError
from safedl.serve.stores import engine as engines

DAY_S = 86_400.0
MIN_DAYS, MAX_DAYS = 1.0, 3650.0
BATCH = 2000  # rows a table loses per transaction at most
PURGE_LOCK = 0x5AFED1  # the advisory lock replicas take to purge one at a time

# table -> a statement deleting at most :batch rows older than :cutoff (seconds; minutes for ``unauthenticated``)
_DELETES = {
    "audit": engines.Hot("DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < :cutoff ORDER BY id "
                         "LIMIT :batch)"),
    "bundle_swaps": engines.Hot("DELETE FROM bundle_swaps WHERE id IN (SELECT id FROM bundle_swaps WHERE ts < "
                                ":cutoff ORDER BY id LIMIT :batch)"),
    "monitor_alerts": engines.Hot("DELETE FROM monitor_alerts WHERE alert_id IN (SELECT alert_id FROM "
                                  "monitor_alerts WHERE state = 'resolved' AND resolved_at < :cutoff LIMIT :batch)"),
    "unauthenticated": engines.Hot("DELETE FROM unauthenticated WHERE minute < :cutoff_minute"),
}
_PG_LOCK = engines.Hot("SELECT pg_try_advisory_xact_lock(:lock)")


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Keep ``days`` of audit rows; purge at most every ``interval_s`` seconds once a pass found nothing more."""

    days: float
    interval_s: float = 600.0
    batch: int = BATCH

    def __post_init__(self) -> None:
        d = self.days
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not MIN_DAYS <= float(d) <= MAX_DAYS:
            raise UserError(f"--audit-retention-days {d!r}: must be a number of days from {MIN_DAYS:g} to "
                            f"{MAX_DAYS:g} (30-90 is typical)")
        if not 0 < self.interval_s < float("inf") or self.batch < 1:
            raise UserError(f"audit retention: interval_s {self.interval_s!r} must be positive and finite, "
                            f"batch {self.batch!r} at least 1")

    def cutoff(self, now: float) -> float:
        """Rows before this time (Unix seconds) are expired."""
        return float(now) - float(self.days) * DAY_S


def purge_batch(conn: engines.HotConnection, *, cutoff: float, batch: int) -> dict[str, int]:
    """Delete one batch of expired rows from every audit table inside ``conn``'s transaction; returns the rows
    deleted per table (``{}`` when another PostgreSQL replica holds the purge lock)."""
    if conn.postgresql:
        (got,), = _PG_LOCK.run(conn, {"lock": PURGE_LOCK})
        if not got:
            return {}
    deleted: dict[str, int] = {}
    params = {"cutoff": float(cutoff), "batch": int(batch), "cutoff_minute": int(cutoff // 60)}
    for table, stmt in _DELETES.items():
        cur = conn.dbapi.cursor()
        try:
            cur.execute(stmt.pyformat if conn.postgresql else stmt.sql, params)
            deleted[table] = max(0, int(cur.rowcount))
        finally:
            cur.close()
    return deleted
