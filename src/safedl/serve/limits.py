"""Per-key rate limits: a token bucket (burst, sustained rate) over requests and a daily quota over images.

The state lives in the key database, and every check is one statement, atomic by itself (``INSERT ... ON CONFLICT DO UPDATE
... WHERE <allowed> RETURNING``) that computes the refill, the take and the quota in SQL: the limits are exact
across the service's threads, its worker processes and, on PostgreSQL, its replicas (no read-then-write race). A
refused check writes nothing (the refill is continuous, so not writing it changes no later answer); the wait it
reports (Retry-After) is read just after it (a hint: the refusal itself was decided atomically).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable


from safedl.serve.keys import ApiKey, KeyStore
from safedl.serve.stores import engine as engines


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


def _refilled(table: str) -> str:
    """SQL: the row's tokens after refilling at ``:rate`` since its ``updated_at``, capped at ``:burst``."""
    grown = (f"{table}.tokens + (CASE WHEN {table}.updated_at < :now THEN :now - {table}.updated_at ELSE 0.0 END)"
             " * :rate")
    return f"(CASE WHEN {grown} < :burst THEN {grown} ELSE :burst END)"


_USED = "(CASE WHEN rate_state.day = :day THEN rate_state.used ELSE 0 END)"
# One statement per check, the same SQL on SQLite (>= 3.35) and PostgreSQL; a refused check updates no row and
# returns none. Run on the DBAPI cursor (engines.Hot): the request path's cost.
_TAKE = engines.Hot(
    "INSERT INTO rate_state (key_id, tokens, updated_at, day, used) VALUES (:key_id, :burst - 1.0, :now, :day, 0) "
    f"ON CONFLICT (key_id) DO UPDATE SET tokens = {_refilled('rate_state')} - 1.0, updated_at = :now, day = :day, "
    f"used = {_USED} WHERE {_refilled('rate_state')} >= 1.0 AND {_USED} < :quota RETURNING tokens")
_IMAGES = engines.Hot(
    "INSERT INTO rate_state (key_id, tokens, updated_at, day, used) VALUES (:key_id, :burst, :now, :day, :images) "
    f"ON CONFLICT (key_id) DO UPDATE SET used = {_USED} + :images, day = :day "
    f"WHERE {_USED} + :images <= :quota RETURNING used")
_PIXELS = engines.Hot(
    "INSERT INTO pixel_state (key_id, tokens, updated_at) VALUES (:key_id, :burst - :pixels, :now) "
    f"ON CONFLICT (key_id) DO UPDATE SET tokens = {_refilled('pixel_state')} - :pixels, updated_at = :now "
    f"WHERE {_refilled('pixel_state')} >= :pixels RETURNING tokens")
_RATE_ROW = engines.Hot("SELECT tokens, updated_at FROM rate_state WHERE key_id = :key_id")
_PIXEL_ROW = engines.Hot("SELECT tokens, updated_at FROM pixel_state WHERE key_id = :key_id")


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
        args = {"key_id": key.key_id, "now": now, "day": _utc_day(now), "rate": float(key.rate_per_s),
                "burst": float(key.burst), "quota": int(key.daily_quota)}
        with engines.hot(self.store.engine, what=self._what()) as conn:
            if _TAKE.run(conn, args):
                return Verdict(True)
            (stored, updated), = _RATE_ROW.run(conn, args)
        tokens = _refill(stored, updated, now=now, rate_per_s=key.rate_per_s, burst=key.burst)
        if tokens < 1.0:
            return Verdict(False, "rate", max(1, math.ceil((1.0 - tokens) / key.rate_per_s)))
        return Verdict(False, "quota", _seconds_to_midnight(now))

    def charge_images(self, key: ApiKey, *, images: int) -> Verdict:
        """Count ``images`` against today's quota (after decoding, when the count is known); refuse if over."""
        now = self.clock()
        if images > key.daily_quota:
            return Verdict(False, "quota", _seconds_to_midnight(now))
        args = {"key_id": key.key_id, "now": now, "day": _utc_day(now), "burst": float(key.burst),
                "images": int(images), "quota": int(key.daily_quota)}
        with engines.hot(self.store.engine, what=self._what()) as conn:
            ok = bool(_IMAGES.run(conn, args))
        return Verdict(True) if ok else Verdict(False, "quota", _seconds_to_midnight(now))

    def charge_pixels(self, key: ApiKey, *, pixels: int, rate_per_s: float, burst: int) -> Verdict:
        """Spend ``pixels`` from the key's pixel bucket (``burst`` pixels, refilled at ``rate_per_s``); refused
        with the wait until enough pixels have accrued (a request larger than ``burst`` never fits: the per-request
        cap, checked before, is at most ``burst``)."""
        now = self.clock()
        if pixels > burst:
            return Verdict(False, "pixels", max(1, math.ceil((pixels - burst) / rate_per_s)))
        args = {"key_id": key.key_id, "now": now, "rate": float(rate_per_s), "burst": float(burst),
                "pixels": float(pixels)}
        with engines.hot(self.store.engine, what=self._what()) as conn:
            if _PIXELS.run(conn, args):
                return Verdict(True)
            (stored, updated), = _PIXEL_ROW.run(conn, args)
        tokens = _refill(stored, updated, now=now, rate_per_s=rate_per_s, burst=burst)
        return Verdict(False, "pixels", max(1, math.ceil((pixels - tokens) / rate_per_s)))
