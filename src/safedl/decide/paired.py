"""One-sided bounds for the paired comparisons of a canary with the stable version on the same probe images.

``paired_difference`` bounds p_a - p_b, two proportions measured on the same n items (a_i, b_i in {0, 1}), with
Newcombe's hybrid score interval for paired data (Newcombe 1998, "Improved confidence intervals for the difference
between binomial proportions based on paired data", Statistics in Medicine 17, method 10): Wilson intervals of
each margin combined with the phi correlation of the pairs. A one-sided 95% bound is one end of the two-sided
90% interval.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import torch

from safedl.utils.stats import wilson_interval


def z_one_sided(confidence: float) -> float:
    """The normal quantile of a one-sided bound at ``confidence`` (0.95 -> 1.645)."""
    return NormalDist().inv_cdf(float(confidence))


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, confidence: float = 0.95) -> dict[str, Any]:
    """p_a - p_b with its one-sided ``confidence`` bounds (``lower``: p_a - p_b is at least this; ``upper``: at
    most this) and n; ``a`` and ``b`` are boolean outcomes of the same items."""
    a, b = a.bool().flatten(), b.bool().flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths ({a.numel()} and {b.numel()})")
    n = int(a.numel())
    if n == 0:
        return {"value": None, "lower": -1.0, "upper": 1.0, "n": 0}
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b, neither = int((~a & b).sum()), int((~a & ~b).sum())
    z = z_one_sided(confidence)
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z=z)
    l2, u2 = wilson_interval(both + only_b, n, z=z)
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"value": d, "lower": max(-1.0, d - dl), "upper": min(1.0, d + du), "n": n}


def proportion_bounds(k: int, n: int, *, confidence: float = 0.95) -> dict[str, Any]:
    """k / n with its one-sided ``confidence`` Wilson bounds and n."""
    lo, hi = wilson_interval(int(k), int(n), z=z_one_sided(confidence))
    return {"value": (k / n) if n else None, "lower": lo, "upper": hi, "n": int(n)}
