"""Benign query streams of one simulated API key: how a query detector's threshold is calibrated and its false-alarm
rate measured (offline, in the defense stage and the benchmarks)."""
from __future__ import annotations

import torch

from safedl.models.train import random_shift


def in_order_stream(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``x`` in order, then further passes, each with a fresh random 2-pixel shift (distinct natural-looking images)."""
    g = torch.Generator().manual_seed(int(seed))
    parts, total = [x], len(x)
    while total < n:
        parts.append(random_shift(x, 2, g))
        total += len(x)
    return torch.cat(parts)[:n]


def burst_stream(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Each image (random order) sent 1-5 times, the repeats small random crops (2-pixel shifts) and brightness
    changes (x0.8-1.2): a legitimate user retrying."""
    g = torch.Generator().manual_seed(int(seed))
    out, total = [], 0
    while total < n:
        img = x[torch.randint(len(x), (1,), generator=g)]
        reps = int(torch.randint(1, 6, (1,), generator=g))
        burst = img.expand(reps, -1, -1, -1)
        if reps > 1:
            tail = random_shift(burst[1:], 2, g) * (0.8 + 0.4 * torch.rand(reps - 1, 1, 1, 1, generator=g))
            burst = torch.cat([img, tail.clamp(0, 1)])
        out.append(burst)
        total += reps
    return torch.cat(out)[:n]


def calibration_streams(x: torch.Tensor, *, seed: int, in_order: int = 3500, bursts: int = 2000) -> list[torch.Tensor]:
    """The benign streams thresholds are calibrated on: one in-order stream (``in_order`` queries) and two retry-burst
    streams (``bursts`` each) of ``x`` (training images: the key streams a detector is then judged on must not be
    these)."""
    return ([in_order_stream(x, in_order, seed=seed + 100)]
            + [burst_stream(x, bursts, seed=seed + 200 + i) for i in range(2)])
