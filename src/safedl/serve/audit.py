"""The audit log: one row per request and image, committed before the response is sent (SQLite, WAL).

A single writer thread commits the rows of all requests waiting at that moment in one transaction (group commit)
and then releases them (when it is idle, a worker thread may commit its request's rows itself, saving a hand-off); a request whose rows could not be committed (read-only or full location, locked database)
is answered 503, never without a record. With WAL and ``synchronous=NORMAL`` a committed transaction survives a
killed server process (only an operating-system crash can lose the last transactions; pass ``synchronous="FULL"``
to rule that out too, at a higher cost per commit).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import logging
import queue
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from safedl.errors import SafedlError, UserError
from safedl.serve._sqlite import connect, immediate
from safedl.serve.dburl import sqlite_path
from safedl.utils.io import atomic_write_text

log = logging.getLogger("safedl.serve.audit")

COLUMNS = ("ts", "request_id", "image_index", "key_id", "client", "endpoint", "http_status", "error", "tier",
           "input_sha256", "shape", "label", "class_name", "confidence", "rejected", "reason", "detector_scores",
           "latency_ms", "bundle_version")
_TYPES = {"ts": "REAL NOT NULL", "request_id": "TEXT NOT NULL", "image_index": "INTEGER", "http_status": "INTEGER NOT NULL",
          "label": "INTEGER", "confidence": "REAL", "rejected": "INTEGER", "latency_ms": "REAL"}
_SCHEMA = ("CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
           + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS) + ");"
           "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);"
           "CREATE INDEX IF NOT EXISTS audit_request ON audit (request_id);"
           # failures before authentication, aggregated (serve/unauth.py): one row per client, minute, endpoint, code
           "CREATE TABLE IF NOT EXISTS unauthenticated (minute INTEGER NOT NULL, client TEXT NOT NULL, "
           "endpoint TEXT NOT NULL, code TEXT NOT NULL, count INTEGER NOT NULL, "
           "PRIMARY KEY (minute, client, endpoint, code));")
_UPSERT = ("INSERT INTO unauthenticated (minute, client, endpoint, code, count) VALUES (?, ?, ?, ?, ?) "
           "ON CONFLICT (minute, client, endpoint, code) DO UPDATE SET count = count + excluded.count")
# Aggregated rows stop being written once the database holds this share of --audit-max-mb: the rest of the cap is
# kept for the rows of authenticated requests, so keyless traffic can never make legit requests fail.
UNAUTHENTICATED_SHARE = 0.9
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_STOP = object()


class AuditUnavailable(SafedlError, RuntimeError):
    """The audit rows could not be committed: the request must not be answered (HTTP 503)."""


class AuditStore:
    """``submit(rows) -> Future`` resolved once the rows are committed; ``start()`` / ``close()`` run the writer."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", max_group: int = 512,
                 max_bytes: int | None = None):
        self.path = sqlite_path(path, what="audit database")
        self.max_bytes = max_bytes  # size cap of the database file: once reached, requests are answered 503
        self.synchronous = synchronous
        self.max_group = max_group
        self.healthy = False
        self.last_error: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()  # one transaction at a time: the writer's or an inline one

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._open()
        self._thread = threading.Thread(target=self._run, name="safedl-audit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, checkpoint the WAL and close (graceful shutdown)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
            except sqlite3.Error as exc:
                log.warning("audit close: %s", exc)
            self._conn = None

    def _open(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path, synchronous=self.synchronous)
            conn.executescript(_SCHEMA)
            if self.max_bytes is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={max(1, int(self.max_bytes) // page)}")
            self._conn = conn
            self.healthy, self.last_error = True, None
            return True
        except (sqlite3.Error, OSError) as exc:
            self._fail(f"cannot open the audit database {self.path}: {exc}")
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
            item = self._queue.get()
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
        with self._conn_lock:
            try:
                if self._conn is None or (self.max_bytes is not None and self._size() >= UNAUTHENTICATED_SHARE
                                          * self.max_bytes):
                    return 0
                with immediate(self._conn):
                    self._conn.executemany(_UPSERT, [(r["minute"], r["client"], r["endpoint"], r["code"], r["count"])
                                                     for r in rows])
                return len(rows)
            except (sqlite3.Error, OSError) as exc:
                log.warning("aggregated unauthenticated counts not written: %s", exc)
                return 0

    def _size(self) -> int:
        page, count = (self._conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count"))
        return int(page) * int(count)

    def _write(self, rows: list[tuple]) -> None:
        try:
            if self._conn is None and not self._open():
                raise AuditUnavailable(self.last_error or "audit database unavailable")
            with immediate(self._conn):
                self._conn.executemany(_INSERT, rows)
            self.healthy, self.last_error = True, None
        except (sqlite3.Error, OSError) as exc:
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


def read_rows(db: str | Path, *, since: float | None = None, until: float | None = None) -> Iterator[dict]:
    db = sqlite_path(db, what="--db")
    if not db.is_file():
        raise UserError(f"--db {db}: no such audit database")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        cur = conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM audit WHERE ts >= ? AND ts < ? ORDER BY id",
                           (since if since is not None else float("-inf"), until if until is not None else float("inf")))
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row))
        conn.close()
    except sqlite3.Error as exc:
        raise UserError(f"--db {db}: cannot read the audit table ({exc})") from None


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
