"""Benign query streams (calibration and false-alarm measurement of the query detectors): a user sending natural
images in order, and a user retrying images with small crops and brightness changes."""
from __future__ import annotations

import torch

from safedl.models.train import random_shift


def in_order_stream(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """x in order, then further passes, each with a fresh random 2-pixel shift (distinct natural-looking images)."""
    g = torch.Generator().manual_seed(seed)
    parts, total = [x], len(x)
    while total < n:
        parts.append(random_shift(x, 2, g))
        total += len(x)
    return torch.cat(parts)[:n]


def burst_stream(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Each image (random order) sent 1-5 times; repeats are small random crops and brightness changes."""
    g = torch.Generator().manual_seed(seed)
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
