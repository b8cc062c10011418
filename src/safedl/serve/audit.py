"""The audit log: one row per request and image, committed before the response is sent (a SQLite file or a
PostgreSQL database: serve/stores/engine.py).

A single writer thread commits the rows of all requests waiting at that moment in one transaction (group commit)
and then releases them (when it is idle, a worker thread may commit its request's rows itself, saving a hand-off); a
request whose rows could not be committed (read-only or full location, locked or unreachable database, exhausted
pool) is answered 503, never without a record, and the store recovers by itself once the database answers again.
On SQLite, with WAL and ``synchronous=NORMAL`` a committed transaction survives a killed server process (only an
operating-system crash can lose the last transactions; pass ``synchronous="FULL"`` to rule that out too, at a
higher cost per commit); on PostgreSQL a commit is durable as the server is configured.

``max_bytes`` (``--audit-max-mb``) caps what the audit rows take: on SQLite the file may not grow past the empty
schema's pages plus ``max_bytes`` (a hard limit, ``PRAGMA max_page_count``); on PostgreSQL the summed
``pg_total_relation_size`` of the audit tables (schema.AUDIT_TABLES, indexes and TOAST included), checked before
every group commit and again after its inserts, inside its transaction: a group that would take them past the cap
is rolled back and its requests answered 503, so no acknowledged row lies beyond it (the rolled-back rows' pages stay
allocated until VACUUM, as deleted rows' do).

``retention`` (``--audit-retention-days``) deletes rows older than that many days, one bounded batch at a time in
the writer thread between group commits (serve/stores/retention.py: why that never races an insert).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import functools
import io
import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event

from safedl.errors import UserError
from safedl.serve.stores import engine as engines
from safedl.serve.stores import sqlite as sqlite_settings
from safedl.serve.stores.migrate import ensure_schema
from safedl.serve.stores.retention import Retention, purge_batch
from safedl.serve.stores.schema import AUDIT_COLUMNS, AUDIT_TABLES, audit, metadata
from safedl.utils.io import atomic_write_text

log = logging.getLogger("safedl.serve.audit")

COLUMNS = AUDIT_COLUMNS
# Aggregated rows stop being written once the database holds this share of --audit-max-mb: the rest of the cap is
# kept for the rows of authenticated requests, so keyless traffic can never make legit requests fail.
UNAUTHENTICATED_SHARE = 0.9
POOL_SIZE = 2  # the writer thread and one inline commit at a time (``_conn_lock`` serializes them anyway)
_STOP = object()
_UNAUTH_KEY = ("minute", "client", "endpoint", "code")
_UNAUTH_UPSERT = engines.Hot(
    "INSERT INTO unauthenticated (minute, client, endpoint, code, count) VALUES (:minute, :client, :endpoint, :code, "
    ":count) ON CONFLICT (minute, client, endpoint, code) DO UPDATE SET count = unauthenticated.count + "
    "excluded.count")
_PAGE_SIZE, _PAGE_COUNT = engines.Hot("PRAGMA page_size"), engines.Hot("PRAGMA page_count")
_PG_SIZE = engines.Hot("SELECT COALESCE(SUM(pg_total_relation_size(to_regclass(t))), 0) "
                       "FROM unnest(CAST(:tables AS text[])) AS t")
_INSERT = engines.Hot(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)})")


class AuditUnavailable(engines.StoreUnavailable):
    """The audit rows could not be committed: the request must not be answered (HTTP 503)."""


@functools.lru_cache(maxsize=1)
def empty_schema_pages() -> int:
    """Pages of a SQLite database holding only the empty schema (what --audit-max-mb does not count)."""
    eng = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    with eng.begin() as conn:
        metadata.create_all(conn)
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                             "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar())
    eng.dispose()
    return pages


class AuditStore:
    """``submit(rows) -> Future`` resolved once the rows are committed; ``start()`` / ``close()`` run the writer.

    The database is opened (and its schema created or checked) here: a schema of another revision raises
    UserError; a location that cannot be opened yet leaves the store unhealthy (503) until it can."""

    def __init__(self, path: str | os.PathLike, *, synchronous: str = "NORMAL", max_group: int = 512,
                 max_bytes: int | None = None, flag: str = "--audit", retention: Retention | None = None,
                 clock: Any = time.time):
        self.target = engines.parse_target(path, flag=flag)
        self.path: Path | str = self.target.path if self.target.is_sqlite else self.target.display
        self.flag = flag
        self.max_bytes = max_bytes  # cap of what the audit rows take: once reached, requests are answered 503
        self.synchronous = synchronous
        self.max_group = max_group
        self.retention = retention
        self.clock = clock
        self.purged: dict[str, int] = {}  # rows deleted by retention so far, per table
        self._purge_at = 0.0  # when the writer runs its next purge batch (monotonic seconds)
        self.healthy = False
        self.last_error: str | None = None
        self.engine: sa.Engine | None = None
        self._ready = False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()  # one transaction at a time: the writer's or an inline one
        self._open(first=True)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._ready:
            self.healthy, self.last_error = True, None
        else:
            self._open()
        self._thread = threading.Thread(target=self._run, name="safedl-audit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, checkpoint the SQLite WAL and close (graceful shutdown)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        if self.engine is not None:
            try:
                engines.checkpoint(self.engine)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("audit close: %s", exc)
            self.engine.dispose()
        self._ready = False

    def _engine(self) -> sa.Engine:
        if self.engine is None:
            if self.target.is_sqlite:
                self.target.path.parent.mkdir(parents=True, exist_ok=True)
            eng = engines.open_engine(self.target, flag=self.flag, synchronous=self.synchronous,
                                      pool_size=POOL_SIZE, max_overflow=2)
            if self.target.is_sqlite and self.max_bytes is not None:
                pages = empty_schema_pages() + max(1, int(self.max_bytes) // 4096)

                @event.listens_for(eng, "connect")
                def _cap(dbapi_conn: Any, record: Any) -> None:
                    sqlite_settings.set_max_pages(dbapi_conn, pages)
            self.engine = eng
        return self.engine

    def _open(self, *, first: bool = False) -> bool:
        """Open the database and create or check its schema; False (unhealthy) when it cannot be opened yet. A
        schema of another revision raises UserError the first time (the server does not start), later it only
        keeps the store unhealthy."""
        try:
            ensure_schema(self._engine(), what=f"audit database {self.path}")
            self._ready = True
            return True
        except (engines.StoreUnavailable, OSError) as exc:
            self._fail(f"cannot open the audit database {self.path}: {exc}")
        except UserError as exc:
            if first:
                raise
            self._fail(str(exc))
        return False

    def _fail(self, message: str) -> None:
        if self.healthy or self.last_error != message:
            log.error("audit unavailable, answering 503 until it recovers: %s", message,
                      extra={"event": "audit_unavailable", "audit_path": str(self.path)})
        self.healthy, self.last_error = False, message

    # -- writing ---------------------------------------------------------------------------------------------
    def submit(self, rows: list[dict[str, Any]]) -> cf.Future:
        fut: cf.Future = cf.Future()
        if self._thread is None:
            fut.set_exception(AuditUnavailable("the audit writer is not running"))
        else:
            self._queue.put((fut, [tuple(_cell(r.get(c)) for c in COLUMNS) for r in rows]))
        return fut

    def _run(self) -> None:
        while True:
            self._purge_if_due()
            try:
                item = self._queue.get(timeout=self._purge_wait())
            except queue.Empty:
                continue
            if item is _STOP:
                return
            group = [item]
            stop = False
            while len(group) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
            self._commit(group)
            if stop:
                return

    # -- retention -------------------------------------------------------------------------------------------
    def _purge_wait(self) -> float | None:
        if self.retention is None:
            return None
        return min(60.0, max(0.0, self._purge_at - time.monotonic()))

    def _purge_if_due(self) -> None:
        if self.retention is None or time.monotonic() < self._purge_at:
            return
        try:
            deleted = self.purge_expired()
        except AuditUnavailable:
            deleted = {}
        more = any(n >= self.retention.batch for n in deleted.values())  # a full batch: go on after the next group
        self._purge_at = time.monotonic() + (0.0 if more else self.retention.interval_s)

    def purge_expired(self, *, now: float | None = None) -> dict[str, int]:
        """Delete one batch of rows older than the retention (per table; ``{}`` without retention), under the
        commit lock: no group commit of this store runs meanwhile. Raises AuditUnavailable if the database fails."""
        if self.retention is None:
            return {}
        cutoff = self.retention.cutoff(self.clock() if now is None else now)
        with self._conn_lock:
            try:
                if not self._ready and not self._open():
                    raise AuditUnavailable(self.last_error or "audit database unavailable")
                with engines.hot(self.engine, what=f"audit retention in {self.path}", transaction=True) as conn:
                    deleted = purge_batch(conn, cutoff=cutoff, batch=self.retention.batch)
            except (engines.StoreUnavailable, OSError) as exc:
                log.warning("audit retention: %s", exc)
                raise AuditUnavailable(str(exc)) from None
        for table, n in deleted.items():
            self.purged[table] = self.purged.get(table, 0) + n
        if any(deleted.values()):
            log.info("audit retention deleted %s", deleted, extra={"event": "audit_retention", "deleted": deleted})
        return deleted

    def try_commit_inline(self, rows: list[dict[str, Any]]) -> bool:
        """Commit ``rows`` now, in the calling (worker) thread, if the writer is idle; False if it is not (then
        ``submit`` them). Raises AuditUnavailable if the commit fails."""
        if self._thread is None or not self._queue.empty() or not self._conn_lock.acquire(blocking=False):
            return False
        try:
            self._write([tuple(_cell(r.get(c)) for c in COLUMNS) for r in rows])
        finally:
            self._conn_lock.release()
        return True

    def record_unauthenticated(self, rows: list[dict[str, Any]]) -> int:
        """Add aggregated counts of failures before authentication; returns how many rows were written (0 when
        the database is past ``UNAUTHENTICATED_SHARE`` of its cap or cannot be written: those counts are dropped,
        the caller counts them)."""
        if not rows or self._thread is None:
            return 0
        merged: dict[tuple, int] = {}
        for r in rows:  # one row per key: PostgreSQL refuses to update one row twice in a statement
            k = tuple(r[c] for c in _UNAUTH_KEY)
            merged[k] = merged.get(k, 0) + int(r["count"])
        with self._conn_lock:
            try:
                if not self._ready and not self._open():
                    return 0
                with engines.hot(self.engine, what=f"audit database {self.path}", transaction=True) as conn:
                    if self.max_bytes is not None and self._size(conn) >= UNAUTHENTICATED_SHARE * self.max_bytes:
                        return 0
                    _UNAUTH_UPSERT.run_many(conn, [dict(zip(_UNAUTH_KEY, k), count=n) for k, n in merged.items()])
                return len(merged)
            except (engines.StoreUnavailable, OSError) as exc:
                log.warning("aggregated unauthenticated counts not written: %s", exc)
                return 0

    def _size(self, conn: engines.HotConnection) -> int:
        """What the audit rows take, in bytes (see the module's note on ``max_bytes``)."""
        if not conn.postgresql:
            (page,), = _PAGE_SIZE.run(conn, {})
            (count,), = _PAGE_COUNT.run(conn, {})
            return max(0, int(count) - empty_schema_pages()) * int(page)
        (size,), = _PG_SIZE.run(conn, {"tables": list(AUDIT_TABLES)})
        return int(size)

    def _write(self, rows: list[tuple]) -> None:
        try:
            if not self._ready and not self._open():
                raise AuditUnavailable(self.last_error or "audit database unavailable")
            with engines.hot(self.engine, what=f"audit write to {self.path}", transaction=True) as conn:
                if self.max_bytes is not None and conn.postgresql and self._size(conn) >= self.max_bytes:
                    raise AuditUnavailable(f"the audit tables reached --audit-max-mb "
                                           f"({self.max_bytes / 2**20:g} MB)")
                _INSERT.run_many(conn, [dict(zip(COLUMNS, r)) for r in rows])
                if self.max_bytes is not None and conn.postgresql and self._size(conn) > self.max_bytes:
                    raise AuditUnavailable(f"this group of {len(rows)} rows would take the audit tables past "
                                           f"--audit-max-mb ({self.max_bytes / 2**20:g} MB); rolled back")
            self.healthy, self.last_error = True, None
        except (engines.StoreUnavailable, OSError) as exc:
            self._fail(f"audit write to {self.path} failed: {exc}")
            raise AuditUnavailable(str(exc)) from None

    def _commit(self, group: list) -> None:
        try:
            with self._conn_lock:
                self._write([row for _, rows in group for row in rows])
        except AuditUnavailable as exc:
            for fut, _ in group:
                fut.set_exception(exc)
            return
        for fut, _ in group:
            fut.set_result(None)


def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, bool):
        return int(v)
    return v


# -- export ------------------------------------------------------------------------------------------------------
def parse_time(text: str | None, *, flag: str) -> float | None:
    """ISO 8601 date or date-time (naive means UTC) -> Unix seconds."""
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{flag} {text!r}: not an ISO 8601 date or time (e.g. 2026-11-30 or 2026-11-30T01:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def read_rows(db: str | os.PathLike, *, since: float | None = None, until: float | None = None) -> Iterator[dict]:
    """The audit rows in [since, until), oldest first (the table is read as it is: any schema revision)."""
    target = engines.parse_target(db, flag="--db")
    if target.is_sqlite and not target.path.is_file():
        raise UserError(f"--db {target.display}: no such audit database")
    eng = engines.open_engine(target, flag="--db", pool_size=1, max_overflow=0)
    query = (sa.select(audit.c.id, *(audit.c[c] for c in COLUMNS))
             .where(audit.c.ts >= (since if since is not None else float("-inf")),
                    audit.c.ts < (until if until is not None else float("inf"))).order_by(audit.c.id))
    try:
        with eng.connect() as conn:
            for row in conn.execute(query):
                yield dict(row._mapping)
    except sa.exc.SQLAlchemyError as exc:
        raise UserError(f"--db {target.display}: cannot read the audit table ({engines.first_line(exc)})") from None
    finally:
        eng.dispose()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (starting with = + - @ tab or CR) prefixed with a single
    quote (OWASP CSV injection); numbers and other text are left as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def export_rows(db: str | Path, out: str | Path, *, fmt: str, since: float | None = None,
                until: float | None = None) -> int:
    """Write the rows in [since, until) to ``out`` as CSV or JSONL (atomically); returns the row count. In CSV,
    text cells that would start a spreadsheet formula are neutralized (:func:`csv_safe`); JSONL stays exact."""
    if fmt not in ("csv", "jsonl"):
        raise UserError(f"--format {fmt!r} is not allowed; choose csv or jsonl")
    rows = list(read_rows(db, since=since, until=until))
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.DictWriter(buf, fieldnames=["id", *COLUMNS])
        w.writeheader()
        w.writerows({k: csv_safe(v) for k, v in r.items()} for r in rows)
    else:
        for r in rows:
            buf.write(json.dumps(r) + "\n")
    atomic_write_text(out, buf.getvalue())
    return len(rows)
