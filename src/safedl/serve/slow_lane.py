"""The slow lane: connections from a client whose budget of failed authentications is spent (serve/unauth.py) are
read one request at a time, at a bounded rate over all such clients together.

Refusing a keyless request is cheap, but not free (a head parse, a lookup, an answer: well under a millisecond),
and an attacker who does not wait for ``Retry-After`` sends the next one at once over each of its connections. So a
flood of cheap refusals still takes the event loop from authenticated clients, in proportion to the attacker's
connections. In the lane, such a connection is not read at all (its bytes wait in the kernel) until the lane
releases it; the lane releases at most ``rate_per_s`` requests a second, first come first served, so the server's
work for penalized clients is bounded whatever they send. A penalized client may keep at most
``max_connections_per_client`` connections (the rest are refused at once, like any connection over a limit).

A connection that has presented a valid key is never held again (a keyholder behind an attacker's address is
slowed only until its first request is answered), and connections from trusted proxies are not held (behind a
proxy, the proxy's address says nothing about the client: limit at the proxy). Held connections keep their
deadlines: one held past the header deadline is answered 408 and closed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable

from safedl.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlowLaneLimits:
    """The lane's release rate (requests a second, all penalized clients together) and its per-client cap."""

    rate_per_s: float = 50.0
    burst: int = 10
    max_connections_per_client: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.rate_per_s, (int, float)) and not isinstance(self.rate_per_s, bool)
                and math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise UserError(f"--slow-lane-rate {self.rate_per_s!r}: must be a finite number of requests per "
                            "second above 0")
        for name in ("burst", "max_connections_per_client"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"SlowLaneLimits.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class _Waiting:
    release: Callable[[], None]
    alive: Callable[[], bool]


class SlowLane:
    """``penalized(client)`` says whether to hold a connection; ``hold(release, alive)`` queues it; the lane calls
    ``release()`` of the queued connections that are still ``alive()``, in order, at most ``rate_per_s`` a second.
    Used from the event loop's thread only."""

    def __init__(self, *, limits: SlowLaneLimits, penalized: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.limits, self.is_penalized, self.clock = limits, penalized, clock
        self._queue: deque[_Waiting] = deque()
        self._tokens, self._updated = float(limits.burst), clock()
        self._timer: asyncio.TimerHandle | None = None

    def penalized(self, client: str | None) -> bool:
        """Whether connections of ``client`` (a direct peer's address; None: exempt) go through the lane."""
        return client is not None and self.is_penalized(client)

    def hold(self, release: Callable[[], None], *, alive: Callable[[], bool]) -> None:
        """Queue a connection: ``release()`` is called (from the event loop) when its turn comes."""
        self._queue.append(_Waiting(release, alive))
        if self._timer is None:  # else the pending timer releases it in turn
            self._drain()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.limits.burst), self._tokens + (now - self._updated) * self.limits.rate_per_s)
        self._updated = now

    def _drain(self) -> None:
        self._timer = None
        self._refill()
        while self._queue and self._tokens >= 1.0:
            waiting = self._queue.popleft()
            if waiting.alive():  # a connection that closed while queued costs no turn
                self._tokens -= 1.0
                waiting.release()
        while self._queue and not self._queue[0].alive():
            self._queue.popleft()
        if self._queue and self._timer is None:
            delay = (1.0 - self._tokens) / self.limits.rate_per_s
            self._timer = asyncio.get_running_loop().call_later(max(delay, 0.001), self._drain)

    def close(self) -> None:
        """Cancel the release timer and forget the queue."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
