"""Per-key rate limits: a token bucket (burst, sustained rate) over requests and a daily quota over images.

The state lives in the key database, and every check is one atomic statement (``INSERT ... ON CONFLICT DO UPDATE
... WHERE <allowed> RETURNING``) that computes the refill, the take and the quota in SQL: the limits are exact
across the service's threads, its worker processes and, on PostgreSQL, its replicas (no read-then-write race). A
refused check writes nothing (the refill is continuous, so not writing it changes no later answer); the wait it
reports (Retry-After) is read in the same transaction.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from safedl.serve.keys import ApiKey, KeyStore
from safedl.serve.stores import engine as engines
from safedl.serve.stores.schema import pixel_state, rate_state


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    kind: str | None = None          # "rate" or "quota" when refused
    retry_after_s: int = 0


def _utc_day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def _seconds_to_midnight(t: float) -> int:
    now = datetime.fromtimestamp(t, timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


def _insert(conn: Connection, table: sa.Table):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _least(a, b):
    return sa.case((a < b, a), else_=b)


def _refilled(table: sa.Table, *, now: float, rate_per_s: float, burst: float):
    """SQL: the row's tokens after refilling at ``rate_per_s`` since its ``updated_at``, capped at ``burst``."""
    elapsed = sa.case((table.c.updated_at < now, sa.literal(now, sa.Float) - table.c.updated_at), else_=0.0)
    return _least(sa.literal(float(burst), sa.Float), table.c.tokens + elapsed * sa.literal(rate_per_s, sa.Float))


def _refill(tokens: float, updated: float, *, now: float, rate_per_s: float, burst: float) -> float:
    return min(float(burst), tokens + max(0.0, now - updated) * rate_per_s)


class RateLimiter:
    """``take(key)``: spend one request token (refused when the bucket or today's quota is empty);
    ``charge_pixels(key, pixels=n, ...)``: spend the pixels the request's image headers declare (decode cost is
    bounded per key, not only per request); ``charge_images(key, images=n)``: count the request's images against
    the quota once they are known. Each raises StoreUnavailable when the key database cannot answer."""

    def __init__(self, store: KeyStore, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock

    def _what(self) -> str:
        return f"rate limits in {self.store.path}"

    def take(self, key: ApiKey) -> Verdict:
        now = self.clock()
        day = _utc_day(now)
        t = rate_state
        refilled = _refilled(t, now=now, rate_per_s=key.rate_per_s, burst=key.burst)
        used = sa.case((t.c.day == day, t.c.used), else_=0)
        with engines.write(self.store.engine, what=self._what()) as conn:
            stmt = _insert(conn, t).values(key_id=key.key_id, tokens=float(key.burst) - 1.0, updated_at=now,
                                           day=day, used=0)
            stmt = stmt.on_conflict_do_update(
                index_elements=[t.c.key_id], set_={"tokens": refilled - 1.0, "updated_at": now, "day": day,
                                                   "used": used},
                where=sa.and_(refilled >= 1.0, used < key.daily_quota)).returning(t.c.tokens)
            if conn.execute(stmt).first() is not None:
                return Verdict(True)
            row = conn.execute(sa.select(t.c.tokens, t.c.updated_at, t.c.day, t.c.used)
                               .where(t.c.key_id == key.key_id)).one()
        tokens = _refill(row.tokens, row.updated_at, now=now, rate_per_s=key.rate_per_s, burst=key.burst)
        if tokens < 1.0:
            return Verdict(False, "rate", max(1, math.ceil((1.0 - tokens) / key.rate_per_s)))
        return Verdict(False, "quota", _seconds_to_midnight(now))

    def charge_images(self, key: ApiKey, *, images: int) -> Verdict:
        """Count ``images`` against today's quota (after decoding, when the count is known); refuse if over."""
        now = self.clock()
        day = _utc_day(now)
        if images > key.daily_quota:
            return Verdict(False, "quota", _seconds_to_midnight(now))
        t = rate_state
        used = sa.case((t.c.day == day, t.c.used), else_=0)
        with engines.write(self.store.engine, what=self._what()) as conn:
            stmt = _insert(conn, t).values(key_id=key.key_id, tokens=float(key.burst), updated_at=now, day=day,
                                           used=images)
            stmt = stmt.on_conflict_do_update(index_elements=[t.c.key_id], set_={"used": used + images, "day": day},
                                              where=used + images <= key.daily_quota).returning(t.c.used)
            ok = conn.execute(stmt).first() is not None
        return Verdict(True) if ok else Verdict(False, "quota", _seconds_to_midnight(now))

    def charge_pixels(self, key: ApiKey, *, pixels: int, rate_per_s: float, burst: int) -> Verdict:
        """Spend ``pixels`` from the key's pixel bucket (``burst`` pixels, refilled at ``rate_per_s``); refused
        with the wait until enough pixels have accrued (a request larger than ``burst`` never fits: the per-request
        cap, checked before, is at most ``burst``)."""
        now = self.clock()
        if pixels > burst:
            return Verdict(False, "pixels", max(1, math.ceil((pixels - burst) / rate_per_s)))
        p = pixel_state
        refilled = _refilled(p, now=now, rate_per_s=rate_per_s, burst=burst)
        with engines.write(self.store.engine, what=self._what()) as conn:
            stmt = _insert(conn, p).values(key_id=key.key_id, tokens=float(burst) - pixels, updated_at=now)
            stmt = stmt.on_conflict_do_update(index_elements=[p.c.key_id],
                                              set_={"tokens": refilled - pixels, "updated_at": now},
                                              where=refilled >= pixels).returning(p.c.tokens)
            if conn.execute(stmt).first() is not None:
                return Verdict(True)
            row = conn.execute(sa.select(p.c.tokens, p.c.updated_at).where(p.c.key_id == key.key_id)).one()
        tokens = _refill(row.tokens, row.updated_at, now=now, rate_per_s=rate_per_s, burst=burst)
        return Verdict(False, "pixels", max(1, math.ceil((pixels - tokens) / rate_per_s)))
