"""The stateful query detectors' shared per-key history in a store database (SQLite or PostgreSQL): the
:class:`~safedl.defenses.query.history.SharedHistory` that workers and replicas of ``safedl serve`` share, so a key's
queries spread over them are judged together.

One exchange is one write transaction of the calling detector (the monitor's worker thread, never the request path):

1. ``query_history_keys``: the (detector, key)'s query count is raised by the batch's size (an upsert ... RETURNING,
   which holds the row's lock until the commit: the exchanges of one key are serialized, so every row numbered
   below the batch is committed and readable; none can appear later below it);
2. the rows other writers appended after the caller's count (or the key's last ``window`` queries), oldest first;
3. the batch itself as one row: its end in the key's order, the writer, the feature size, the features as
   float16 bytes (``dim`` x 2 bytes a query);
4. now and then, the rows no later exchange can ask for (older than the key's last ``window`` queries), and rows
   older than ``retention_s`` (keys gone quiet).

Per key at most about twice ``window`` queries are kept. While the database is unavailable an exchange returns None
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
        self.engine = engines.open_engine(target, flag=flag, pool_size=1, max_overflow=2)
        ensure_schema(self.engine, what=f"query history in {self.display}")
        self.writer = writer or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.retention_s, self.clock = float(retention_s), clock
        self._pruned_at = float("-inf")
        self._down = False
        self.unavailable = 0  # exchanges that found the database unavailable

    def exchange(self, *, detector: str, key: str, feats: torch.Tensor, since: int | None,
                 window: int) -> Exchange | None:
        """See :meth:`SharedHistory.exchange`; one write transaction."""
        n, dim = int(feats.shape[0]), int(feats.shape[1])
        blob = feats.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
        now = self.clock()
        ident = {"detector": detector, "key_id": key}
        try:
            with engines.hot(self.engine, what=f"query history in {self.display}", transaction=True) as conn:
                end = int(_BUMP.run(conn, {**ident, "n": n, "now": now})[0][0])
                n_before = end - n
                if since is not None and since > n_before:  # the key's count was reset: hold nothing of it
                    since = None
                lower = n_before - int(window) if since is None else max(since, n_before - int(window))
                rows = _READ.run(conn, {**ident, "lower": lower, "upper": n_before,
                                        "writer": "" if since is None else self.writer})
                if n:  # (an empty batch only reads)
                    _APPEND.run(conn, {**ident, "seq": end, "writer": self.writer, "n": n, "dim": dim,
                                       "feats": blob, "ts": now})
                if n_before // window != end // window:
                    _DROP_OLD.run(conn, {**ident, "cut": n_before - int(window)})
                if now - self._pruned_at >= PRUNE_EVERY_S:
                    _DROP_QUIET.run(conn, {"cut": now - self.retention_s})
                    self._pruned_at = now
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
        earlier, skipped = decode(rows, dim=dim)
        want = max(0, n_before - max(lower, 0))
        earlier = earlier[len(earlier) - min(len(earlier), want):]
        return Exchange(earlier=earlier, n_before=n_before, lost=max(0, want - len(earlier)))

    def forget(self, *, detector: str, key: str | None = None) -> None:
        """Delete the detector's rows and counts of ``key`` (every key when None)."""
        where = "detector = :detector" + ("" if key is None else " AND key_id = :key_id")
        with engines.hot(self.engine, what=f"query history in {self.display}", transaction=True) as conn:
            for table in ("query_history", "query_history_keys"):
                engines.Hot(f"DELETE FROM {table} WHERE {where}").run(conn, {"detector": detector, "key_id": key})

    def close(self) -> None:
        engines.dispose(self.engine)
