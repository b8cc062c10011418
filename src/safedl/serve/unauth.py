"""Bounded work before authentication: a token bucket per client address over failed authentications, and the
failures counted in aggregate (client, minute, endpoint, code) instead of one audit row each.

A request that presents no valid key costs the service a header parse and at most one indexed key lookup. Each
such failure spends one token of its client's bucket; a client whose bucket is empty is answered 429 (with
``Retry-After``) without any lookup, so an outsider can neither brute-force keys quickly nor flood the audit log:
the audit database receives at most one row per (client, minute, endpoint, code), at most ``max_clients_per_minute``
clients a minute (the rest are counted under the client ``(other)``). Valid keys never spend these tokens, so a
keyholder behind the same address is refused only once its own key lookup fails.

A second bucket counts failures from all clients together (``total_rate_per_s``, ``total_burst``): it does not
change any answer, but while it is empty every client with a recent failure is ``penalized`` like one whose own
bucket is empty, so an attack spread over many addresses, each under its own budget, still ends up in the slow
lane (serve/slow_lane.py).

The buckets live in the process: with ``safedl serve --workers N`` each worker has its own, so an address gets up
to N x the burst and rate over the workers its connections land on (documented in the README's Security section).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

OTHER = "(other)"


@dataclass(frozen=True)
class Refusal:
    retry_after_s: int


class UnauthenticatedGuard:
    """``check(client)`` before a lookup, ``failed(client, endpoint, code)`` after one; ``drain()`` the counts."""

    def __init__(self, *, rate_per_s: float, burst: int, total_rate_per_s: float = 20.0, total_burst: int = 100,
                 max_clients: int = 100_000, max_clients_per_minute: int = 1000,
                 clock: Callable[[], float] = time.time):
        self.rate_per_s, self.burst = float(rate_per_s), int(burst)
        self.total_rate_per_s, self.total_burst = float(total_rate_per_s), int(total_burst)
        self._total = (float(total_burst), clock())
        self.max_clients, self.max_clients_per_minute = int(max_clients), int(max_clients_per_minute)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, updated)
        self._counts: dict[tuple[int, str, str, str], int] = {}
        self._minute_clients: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def _tokens(self, client: str, now: float) -> float:
        tokens, updated = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - updated) * self.rate_per_s)

    def _total_tokens(self, now: float) -> float:
        tokens, updated = self._total
        return min(float(self.total_burst), tokens + max(0.0, now - updated) * self.total_rate_per_s)

    def penalized(self, client: str | None) -> bool:
        """Whether ``client``'s connections belong in the slow lane: its own bucket is empty, or the bucket of all
        clients is and this one failed recently (its bucket is not full)."""
        now, who = self.clock(), client or ""
        with self._lock:
            if who not in self._buckets:
                return False
            own = self._tokens(who, now)
            return own < 1.0 or (own < self.burst and self._total_tokens(now) < 1.0)

    def check(self, client: str | None) -> Refusal | None:
        """A refusal if ``client`` has no failure left to spend (then answer 429 without looking the key up)."""
        now = self.clock()
        with self._lock:
            tokens = self._tokens(client or "", now)
        if tokens >= 1.0:
            return None
        return Refusal(max(1, math.ceil((1.0 - tokens) / self.rate_per_s)))

    def failed(self, client: str | None, *, endpoint: str, code: str) -> None:
        """Count one failure before authentication (spends one token of the client's bucket)."""
        now, who = self.clock(), client or ""
        minute = int(now // 60) * 60
        with self._lock:
            self._buckets[who] = (max(0.0, self._tokens(who, now) - 1.0), now)
            self._total = (max(0.0, self._total_tokens(now) - 1.0), now)
            self._buckets.move_to_end(who)
            while len(self._buckets) > self.max_clients:  # LRU: memory stays bounded under address spraying
                self._buckets.popitem(last=False)
            seen = self._minute_clients.setdefault(minute, set())
            if who not in seen and len(seen) >= self.max_clients_per_minute:
                who = OTHER
            seen.add(who)
            k = (minute, who, endpoint, code)
            self._counts[k] = self._counts.get(k, 0) + 1

    def drain(self) -> list[dict]:
        """The counts gathered since the last call, as aggregated audit rows."""
        with self._lock:
            counts, self._counts = self._counts, {}
            current = int(self.clock() // 60) * 60
            self._minute_clients = {m: s for m, s in self._minute_clients.items() if m >= current}
        return [{"minute": m, "client": c, "endpoint": e, "code": code, "count": n}
                for (m, c, e, code), n in sorted(counts.items())]
