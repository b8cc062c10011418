"""Query-volume anomaly per key and globally: a rolling baseline of queries per time bucket, alert at ``sigma``."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from safedl.defenses.query.base import KeyStore, QueryVerdict
from safedl.utils.validate import check_positive

GLOBAL = "__global__"


@dataclass
class _Rate:
    counts: torch.Tensor       # ring of per-bucket counts; slot of bucket b is b % len
    last: int = -1             # bucket index of the newest slot
    first: int = -1            # bucket index of the key's first query
    n_seen: int = 0


class VolumeAnomaly:
    """Alert when a key's queries in the current time bucket exceed its rolling baseline by ``sigma`` deviations.

    The baseline is the mean and standard deviation of the key's last ``baseline_buckets`` completed buckets of
    ``bucket_s`` seconds (standard deviation floored at ``min_std``); a key younger than ``warmup_buckets`` buckets
    is compared with ``prior_rate`` queries per bucket and a Poisson deviation sqrt(prior_rate) instead, or not
    judged when no prior is given. The same statistic runs over all keys together (``global_verdict()``).
    ``clock`` (seconds) is injectable so simulations and tests control time. Memory per key: one small count
    ring; at most ``max_keys`` keys.
    """

    def __init__(self, *, bucket_s: float = 60.0, baseline_buckets: int = 60, sigma: float = 3.0,
                 min_std: float = 1.0, warmup_buckets: int = 5, prior_rate: float | None = None,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.bucket_s = float(check_positive(self, "bucket_s", bucket_s))
        self.baseline_buckets = check_positive(self, "baseline_buckets", baseline_buckets, integer=True)
        self.sigma = float(check_positive(self, "sigma", sigma))
        self.min_std = float(check_positive(self, "min_std", min_std))
        self.warmup_buckets = check_positive(self, "warmup_buckets", warmup_buckets, integer=True)
        self.prior_rate = None if prior_rate is None else float(check_positive(self, "prior_rate", prior_rate))
        self.max_keys = check_positive(self, "max_keys", max_keys, integer=True)
        self.clock = clock
        size = self.baseline_buckets + 1
        self._store: KeyStore[_Rate] = KeyStore(lambda: _Rate(torch.zeros(size, dtype=torch.float64)),
                                                max_keys=self.max_keys)
        self._global = _Rate(torch.zeros(size, dtype=torch.float64))
        self._global_verdict = QueryVerdict(False, 0.0, 0)

    def _advance(self, st: _Rate, bucket: int) -> None:
        size = len(st.counts)
        if st.first < 0:
            st.first = st.last = bucket
            return
        if bucket > st.last:
            gap = min(bucket - st.last, size)
            slots = (torch.arange(st.last + 1, st.last + 1 + gap)) % size
            st.counts[slots] = 0
            st.last = bucket

    def _update(self, st: _Rate, n: int, bucket: int) -> QueryVerdict:
        self._advance(st, bucket)
        size = len(st.counts)
        st.counts[bucket % size] += n
        before = st.n_seen
        st.n_seen += n
        current = float(st.counts[bucket % size])
        completed = min(bucket - st.first, self.baseline_buckets)
        if completed >= self.warmup_buckets:
            slots = (bucket - 1 - torch.arange(completed)) % size
            base = st.counts[slots]
            mean, std = float(base.mean()), float(base.std(unbiased=False))
        elif self.prior_rate is not None:
            mean, std = self.prior_rate, math.sqrt(self.prior_rate)
        else:
            return QueryVerdict(False, 0.0, st.n_seen)
        z = (current - mean) / max(std, self.min_std)
        flagged = z > self.sigma
        return QueryVerdict(flagged, max(0.0, z / self.sigma), st.n_seen, before + n if flagged else None,
                            n if flagged else 0)

    def observe(self, key: str, x: torch.Tensor) -> QueryVerdict:
        """Count the batch for ``key`` and globally; the key's verdict (``global_verdict()`` for all keys)."""
        bucket = int(math.floor(self.clock() / self.bucket_s))
        self._global_verdict = self._update(self._global, len(x), bucket)
        return self._update(self._store.get(key), len(x), bucket)

    def global_verdict(self) -> QueryVerdict:
        return self._global_verdict

    def reset(self, key: str | None = None) -> None:
        self._store.reset(key)
        if key is None:
            self._global = _Rate(torch.zeros(self.baseline_buckets + 1, dtype=torch.float64))
