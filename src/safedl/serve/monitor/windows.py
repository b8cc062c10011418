"""Sliding sums over a scope's (one key's, or all keys') predict requests: by count (the last N requests) and by
time (the last S seconds, in one-second buckets: a request stays in the window S to S + 1 seconds). Bounded
memory: ``max_count`` cumulative rows and at most ``max_seconds`` buckets."""
from __future__ import annotations

import math
from collections import deque

#: what each predict request adds to its scopes' windows
FIELDS = ("requests", "queries", "rejected", "detected", "flags", "stateful_flags", "prada_flags", "volume_flags",
          "anomalous", "copycat_flags", "sybil_flags")


class Windows:
    def __init__(self, *, max_count: int, max_seconds: float):
        self.max_count = int(max_count)
        self.max_seconds = int(math.ceil(max_seconds))
        zero = (0,) * len(FIELDS)
        self._cum: deque[tuple] = deque([zero], maxlen=self.max_count + 1)  # running totals after each request
        self._secs: deque[list] = deque()                                   # [second, *sums]

    def add(self, ts: float, vec: tuple) -> None:
        last = self._cum[-1]
        self._cum.append(tuple(a + b for a, b in zip(last, vec)))
        if self.max_seconds:
            s = int(ts)
            if self._secs and self._secs[-1][0] == s:
                row = self._secs[-1]
                for i, v in enumerate(vec):
                    row[i + 1] += v
            else:
                self._secs.append([s, *vec])
            self._prune(ts)

    def _prune(self, now: float) -> None:
        while self._secs and self._secs[0][0] <= now - self.max_seconds - 1:
            self._secs.popleft()

    def sums(self, *, count: int | None = None, seconds: float | None = None, now: float) -> dict[str, float]:
        """Totals of each field over the last ``count`` requests or the last ``seconds`` seconds."""
        if count is not None:
            n = min(count, len(self._cum) - 1)
            out = tuple(a - b for a, b in zip(self._cum[-1], self._cum[-1 - n]))
        else:
            self._prune(now)
            lo = now - float(seconds) - 1.0  # every bucket [s, s+1) that overlaps [now - seconds, now]
            out = tuple(sum(r[i + 1] for r in self._secs if r[0] > lo) for i in range(len(FIELDS)))
        return dict(zip(FIELDS, out))
