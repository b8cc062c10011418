"""Metric values with 95% intervals: Wilson for proportions, Clopper-Pearson where an exact bound is required."""
from __future__ import annotations

import math
from typing import Any

import torch
from scipy import stats as _st

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (Wilson 1927). n == 0 gives (0, 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided binomial interval (Clopper & Pearson 1934)."""
    if n <= 0:
        return (0.0, 1.0)
    lo = 0.0 if k == 0 else float(_st.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(_st.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (lo, hi)


def proportion(k: int, n: int) -> dict[str, Any]:
    """A results.json metric for a proportion: value, Wilson 95% interval and n."""
    k, n = int(k), int(n)
    lo, hi = wilson_interval(k, n)
    return {"value": (k / n) if n else float("nan"), "ci95": [lo, hi], "n": n}


def mean_metric(values: Any) -> dict[str, Any]:
    """A results.json metric for a mean: value, t-based 95% interval and n."""
    import numpy as np

    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    m = float(v.mean())
    if n == 1:
        return {"value": m, "ci95": [m, m], "n": 1}
    half = float(_st.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"value": m, "ci95": [m - half, m + half], "n": n}


def scalar(value: float, *, n: int | None = None) -> dict[str, Any]:
    """A results.json metric with no sampling interval (a max, a median, a time)."""
    return {"value": float(value), "ci95": None, "n": n}


def auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """Area under the ROC curve of scores (higher = positive), ties counted half (the Mann-Whitney U statistic
    over average ranks); nan when either side is empty. The one AUROC every detector and cleanser reports."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = torch.cat([neg.flatten(), pos.flatten()]).double().cpu()
    uniq, inv = torch.unique(allv, return_inverse=True)
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.double)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, torch.ones_like(ranks))
    avg = (sums / counts)[inv]
    u = avg[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def robust_z(values: torch.Tensor, *, interpolate: bool = False) -> torch.Tensor:
    """(v - median) / (1.4826 * MAD): a z-score that a few outliers cannot hide behind (the MAD of normal data
    times 1.4826 estimates its standard deviation). The lower median, as torch.median, or with ``interpolate``
    the mean of the two middle values of an even count, as numpy's."""
    v = values.double()
    median = (lambda t: t.quantile(0.5)) if interpolate else (lambda t: t.median())
    med = median(v)
    mad = median((v - med).abs()).clamp_min(1e-12) * 1.4826
    return ((v - med) / mad).to(values.dtype if values.is_floating_point() else torch.float64)
