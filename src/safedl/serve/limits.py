"""Per-key rate limits: a token bucket (burst, sustained rate) over requests and a daily quota over images.

The state lives in the key database and every check is one ``BEGIN IMMEDIATE`` transaction, so the limits hold
across the service's threads and worker processes (SQLite serializes the writers).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from safedl.serve._sqlite import immediate
from safedl.serve.keys import ApiKey, KeyStore


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


_PIXEL_SCHEMA = ("CREATE TABLE IF NOT EXISTS pixel_state (key_id TEXT PRIMARY KEY, tokens REAL NOT NULL, "
                 "updated_at REAL NOT NULL)")


class RateLimiter:
    """``take(key)``: spend one request token (refused when the bucket or today's quota is empty);
    ``charge_pixels(key, pixels=n, ...)``: spend the pixels the request's image headers declare (decode cost is
    bounded per key, not only per request); ``charge_images(key, images=n)``: count the request's images against
    the quota once they are known."""

    def __init__(self, store: KeyStore, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self.store.conns.get().execute(_PIXEL_SCHEMA)

    def take(self, key: ApiKey) -> Verdict:
        conn = self.store.conns.get()
        now = self.clock()
        day = _utc_day(now)
        with immediate(conn):
            row = conn.execute("SELECT tokens, updated_at, day, used FROM rate_state WHERE key_id=?",
                               (key.key_id,)).fetchone()
            tokens, updated, last_day, used = row if row else (float(key.burst), now, day, 0)
            tokens = min(float(key.burst), tokens + max(0.0, now - updated) * key.rate_per_s)
            used = used if last_day == day else 0
            if tokens < 1.0:
                verdict = Verdict(False, "rate", max(1, math.ceil((1.0 - tokens) / key.rate_per_s)))
            elif used >= key.daily_quota:
                verdict = Verdict(False, "quota", _seconds_to_midnight(now))
            else:
                tokens -= 1.0
                verdict = Verdict(True)
            conn.execute("INSERT OR REPLACE INTO rate_state (key_id, tokens, updated_at, day, used) VALUES (?,?,?,?,?)",
                         (key.key_id, tokens, now, day, used))
        return verdict

    def charge_images(self, key: ApiKey, *, images: int) -> Verdict:
        """Count ``images`` against today's quota (after decoding, when the count is known); refuse if over."""
        conn = self.store.conns.get()
        now = self.clock()
        day = _utc_day(now)
        with immediate(conn):
            row = conn.execute("SELECT day, used FROM rate_state WHERE key_id=?", (key.key_id,)).fetchone()
            used = row[1] if row and row[0] == day else 0
            if used + images > key.daily_quota:
                verdict = Verdict(False, "quota", _seconds_to_midnight(now))
            else:
                conn.execute("UPDATE rate_state SET used=?, day=? WHERE key_id=?", (used + images, day, key.key_id))
                verdict = Verdict(True)
        return verdict

    def charge_pixels(self, key: ApiKey, *, pixels: int, rate_per_s: float, burst: int) -> Verdict:
        """Spend ``pixels`` from the key's pixel bucket (``burst`` pixels, refilled at ``rate_per_s``); refused
        with the wait until enough pixels have accrued (a request larger than ``burst`` never fits: the per-request
        cap, checked before, is at most ``burst``)."""
        conn = self.store.conns.get()
        now = self.clock()
        with immediate(conn):
            row = conn.execute("SELECT tokens, updated_at FROM pixel_state WHERE key_id=?", (key.key_id,)).fetchone()
            tokens, updated = row if row else (float(burst), now)
            tokens = min(float(burst), tokens + max(0.0, now - updated) * rate_per_s)
            if tokens < pixels:
                verdict = Verdict(False, "pixels", max(1, math.ceil((pixels - tokens) / rate_per_s)))
            else:
                tokens -= pixels
                verdict = Verdict(True)
            conn.execute("INSERT OR REPLACE INTO pixel_state (key_id, tokens, updated_at) VALUES (?,?,?)",
                         (key.key_id, tokens, now))
        return verdict
