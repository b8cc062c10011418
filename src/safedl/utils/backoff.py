"""Batch back-off on out-of-memory: run a batched computation, halving the batch size and retrying the failed
batch whenever the device runs out of memory, and say what it did (the report states the batch size used)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from safedl.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class BackoffReport:
    """The batch size asked for, the one that finally ran, and each halving (size that failed)."""

    requested: int
    used: int
    failed_sizes: list[int] = field(default_factory=list)

    @property
    def note(self) -> str | None:
        """A sentence for the report, or None when nothing was halved."""
        if not self.failed_sizes:
            return None
        return (f"out of memory at batch size {', '.join(map(str, self.failed_sizes))}: halved and retried; "
                f"ran at batch size {self.used} (asked for {self.requested})")


def run_with_backoff(fn: Callable[[slice], T], n: int, *, batch_size: int, min_batch: int = 1
                     ) -> tuple[list[T], BackoffReport]:
    """``fn(slice)`` over ``range(n)`` in batches of ``batch_size``; on ``torch.OutOfMemoryError`` the batch size is
    halved (never below ``min_batch``, then the error propagates) and the same samples are retried. Later batches
    keep the smaller size. Returns the outputs in order and a :class:`BackoffReport`."""
    if batch_size < 1 or min_batch < 1:
        raise ConfigError(f"batch_size and min_batch must be >= 1 (got {batch_size}, {min_batch})")
    report = BackoffReport(requested=batch_size, used=batch_size)
    out: list[T] = []
    i, bs = 0, batch_size
    while i < n:
        sl = slice(i, min(n, i + bs))
        try:
            out.append(fn(sl))
        except torch.OutOfMemoryError:
            if bs <= min_batch:
                raise
            report.failed_sizes.append(bs)
            bs = max(min_batch, bs // 2)
            log.warning("out of memory at batch size %d: retrying with %d", report.failed_sizes[-1], bs)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i = sl.stop
    report.used = bs
    return out, report
