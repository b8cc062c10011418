"""The stateful query detectors' shared per-key history in a store database (SQLite or PostgreSQL): the
:class:`~safedl.defenses.query.history.SharedHistory` that workers and replicas of ``safedl serve`` share, so a key's
queries spread over them are judged together.

One exchange is one write transaction of the calling detector (the monitor's worker thread, never the request path;
on PostgreSQL steps 1-3 are one statement, so one round trip):

1. ``query_history_keys``: the (detector, key)'s query count is raised by the batch's size (an upsert ... RETURNING,
   which holds the row's lock until the commit: the exchanges of one key are serialized, so every row numbered
   below the batch is committed; none can appear later below it);
2. the rows other writers appended after the caller's count (or the key's last ``window`` queries), oldest first;
3. the batch itself as one row: its end in the key's order, the writer, the feature size, the features as
   float16 bytes (``dim`` x 2 bytes a query);
4. now and then, the rows no later exchange can ask for (older than the key's last ``window`` queries), and rows
   older than ``retention_s`` (keys gone quiet).

Per key at most about twice ``window`` queries are kept (784-pixel images, ``window`` 1000: about 3 MB a key). While the database is unavailable an exchange returns None
(logged once per outage): the detector judges the batch on what its process holds, and the batch is not shared.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Callable

import torch

from safedl.defenses.query.history import Exchange
from safedl.serve.stores import engine as engines
from safedl.serve.stores.migrate import ensure_schema

log = logging.getLogger("safedl.serve.stores")
RETENTION_S = 86_400.0
PRUNE_EVERY_S = 60.0
_BUMP = engines.Hot(
    "INSERT INTO query_history_keys (detector, key_id, seq, updated_at) VALUES (:detector, :key_id, :n, :now) "
    "ON CONFLICT (detector, key_id) DO UPDATE SET seq = query_history_keys.seq + excluded.seq, "
    "updated_at = excluded.updated_at RETURNING seq")
_READ = engines.Hot(
    "SELECT seq, n, dim, feats FROM query_history WHERE detector = :detector AND key_id = :key_id AND seq > :lower "
    "AND seq <= :upper AND writer <> :writer ORDER BY seq")
_APPEND = engines.Hot(
    "INSERT INTO query_history (detector, key_id, seq, writer, n, dim, feats, ts) "
    "VALUES (:detector, :key_id, :seq, :writer, :n, :dim, :feats, :ts)")
# PostgreSQL: the three in one statement (its sub-statements share one snapshot, taken before any wait for the
# key's row lock: rows committed during that wait are read again by ``_READ``)
_EXCHANGE_PG = engines.Hot(
    "WITH bump AS (INSERT INTO query_history_keys (detector, key_id, seq, updated_at) "
    "VALUES (:detector, :key_id, :n, :now) ON CONFLICT (detector, key_id) DO UPDATE "
    "SET seq = query_history_keys.seq + excluded.seq, updated_at = excluded.updated_at RETURNING seq), "
    "ins AS (INSERT INTO query_history (detector, key_id, seq, writer, n, dim, feats, ts) "
    "SELECT :detector, :key_id, seq, :writer, :n, :dim, :feats, :now FROM bump WHERE :n > 0) "
    "SELECT seq, NULL, NULL, NULL FROM bump UNION ALL "
    "SELECT h.seq, h.n, h.dim, h.feats FROM query_history h, bump WHERE h.detector = :detector "
    "AND h.key_id = :key_id AND h.seq > GREATEST(:since, bump.seq - :n - :window) AND h.seq <= bump.seq - :n "
    "AND h.writer <> :exclude ORDER BY 1")
_DROP_OLD = engines.Hot("DELETE FROM query_history WHERE detector = :detector AND key_id = :key_id AND seq <= :cut")
_DROP_QUIET = engines.Hot("DELETE FROM query_history WHERE ts < :cut")


def decode(rows: list[tuple], *, dim: int) -> tuple[torch.Tensor, int]:
    """The features of ``rows`` (seq, n, dim, float16 bytes) with feature size ``dim``, stacked in order, and how
    many queries were left out for another size."""
    parts, skipped = [], 0
    for _, n, d, blob in rows:
        if int(d) != dim:
            skipped += int(n)
            continue
        parts.append(torch.frombuffer(bytearray(blob), dtype=torch.float16).view(int(n), dim))
    feats = torch.cat(parts).float() if parts else torch.empty(0, dim)
    return feats, skipped


def history_location(audit: Any, *, flag: str = "--audit") -> Any:
    """Where the service keeps the shared history: next to a SQLite audit file, its own file (``audit.db`` ->
    ``audit.query-history.db``: its writes neither take the audit's write lock, which answered requests wait for,
    nor count against ``--audit-max-mb``); on PostgreSQL the audit database itself (its tables are not among those
    the cap counts)."""
    target = engines.parse_target(audit, flag=flag)
    if not target.is_sqlite:
        return target
    return str(target.path.with_name(f"{target.path.stem}.query-history{target.path.suffix or '.db'}"))


class DatabaseHistory:
    """A ``SharedHistory`` in the database ``path`` (PATH_OR_URL; the service uses its audit database). ``writer``
    names this process's rows (default: random, so a restarted process reads the key's window afresh)."""

    dtype = torch.float16

    def __init__(self, path: Any, *, flag: str = "--audit", writer: str | None = None,
                 retention_s: float = RETENTION_S, clock: Callable[[], float] = time.time):
        target = engines.parse_target(path, flag=flag)
        self.display = target.display
        if target.is_sqlite:
            target.path.parent.mkdir(parents=True, exist_ok=True)
        self.postgresql = not target.is_sqlite
        self.engine = engines.open_engine(target, flag=flag, pool_size=1, max_overflow=2)
        ensure_schema(self.engine, what=f"query history in {self.display}")
        self.writer = writer or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.retention_s, self.clock = float(retention_s), clock
        self._pruned_at = float("-inf")
        self._down = False
        self.unavailable = 0  # exchanges that found the database unavailable

    def exchange(self, *, detector: str, key: str, feats: torch.Tensor, since: int | None,
                 window: int) -> Exchange | None:
        """See :meth:`SharedHistory.exchange`: one write transaction (PostgreSQL: one statement, one round trip,
        plus a second read only when rows the caller is owed were committed while it waited for the key's lock)."""
        n, dim, window = int(feats.shape[0]), int(feats.shape[1]), int(window)
        p = {"detector": detector, "key_id": key, "n": n, "dim": dim, "now": self.clock(), "writer": self.writer,
             "feats": feats.detach().to("cpu", torch.float16).contiguous().numpy().tobytes(), "window": window}
        what = f"query history in {self.display}"
        try:
            with engines.hot(self.engine, what=what, transaction=not self.postgresql) as conn:
                end, rows = (self._one_statement if self.postgresql else self._statements)(conn, p, since)
                n_before = end - n
                if since is not None and since > n_before:  # the key's count was reset: hold nothing of it
                    since, rows = None, None
                lower = n_before - window if since is None else max(since, n_before - window)
                want = max(0, n_before - max(lower, 0))
                if rows is None or sum(int(r[1]) for r in rows) < want:  # (PostgreSQL: its snapshot predates
                    rows = self._read(conn, p, lower=lower, upper=n_before, since=since)  # the lock wait)
                self._maintain(conn, p, n_before=n_before, end=end)
        except engines.StoreUnavailable as exc:
            self.unavailable += 1
            if not self._down:
                log.warning("shared query history unavailable (detectors judge on this process's queries until it "
                            "recovers): %s", exc, extra={"event": "history_unavailable"})
            self._down = True
            return None
        if self._down:
            log.info("shared query history recovered", extra={"event": "history_recovered"})
            self._down = False
        earlier, _ = decode(rows, dim=dim)
        earlier = earlier[len(earlier) - min(len(earlier), want):]
        return Exchange(earlier=earlier, n_before=n_before, lost=max(0, want - len(earlier)))

    def _read(self, conn: engines.HotConnection, p: dict, *, lower: int, upper: int, since: int | None) -> list:
        return _READ.run(conn, {"detector": p["detector"], "key_id": p["key_id"], "lower": lower, "upper": upper,
                                "writer": "" if since is None else self.writer})

    def _statements(self, conn: engines.HotConnection, p: dict, since: int | None) -> tuple[int, list]:
        """SQLite (inside BEGIN IMMEDIATE): count, read, append."""
        end = int(_BUMP.run(conn, p)[0][0])
        n_before = end - p["n"]
        if since is not None and since > n_before:
            since = None
        lower = n_before - p["window"] if since is None else max(since, n_before - p["window"])
        rows = self._read(conn, p, lower=lower, upper=n_before, since=since)
        if p["n"]:  # (an empty batch only reads)
            _APPEND.run(conn, {**p, "seq": end, "ts": p["now"]})
        return end, rows

    def _one_statement(self, conn: engines.HotConnection, p: dict, since: int | None) -> tuple[int, list]:
        """PostgreSQL: count, append and read in one statement."""
        got = _EXCHANGE_PG.run(conn, {**p, "since": -1 if since is None else since,
                                      "exclude": "" if since is None else self.writer})
        return int(next(r[0] for r in got if r[1] is None)), [r for r in got if r[1] is not None]

    def _maintain(self, conn: engines.HotConnection, p: dict, *, n_before: int, end: int) -> None:
        """Drop what no later exchange asks for: the key's rows before its last window (about once a window), and
        every key's rows older than ``retention_s`` (at most once a minute)."""
        window = p["window"]
        if n_before // window != end // window:
            _DROP_OLD.run(conn, {"detector": p["detector"], "key_id": p["key_id"], "cut": n_before - window})
        if p["now"] - self._pruned_at >= PRUNE_EVERY_S:
            _DROP_QUIET.run(conn, {"cut": p["now"] - self.retention_s})
            self._pruned_at = p["now"]

    def forget(self, *, detector: str, key: str | None = None) -> None:
        """Delete the detector's rows and counts of ``key`` (every key when None)."""
        where = "detector = :detector" + ("" if key is None else " AND key_id = :key_id")
        with engines.hot(self.engine, what=f"query history in {self.display}", transaction=True) as conn:
            for table in ("query_history", "query_history_keys"):
                engines.Hot(f"DELETE FROM {table} WHERE {where}").run(conn, {"detector": detector, "key_id": key})

    def close(self) -> None:
        engines.dispose(self.engine)
