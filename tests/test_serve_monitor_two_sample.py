"""The drift tests: the batched MMD permutation test against a loop over permutations (slow reference), its
p-value's (k + 1) / (B + 1) form and level under the null, power under a mean shift; the chi-square homogeneity
test against scipy's contingency-table test."""
from __future__ import annotations

import math
import time

import pytest
import torch

from safedl.serve.monitor.two_sample import (MMDPermutationTest, chi2_homogeneity, gaussian_kernel, median_bandwidth, mmd2,
                                             mmd_permutation_test)


def _slow_mmd2(a: torch.Tensor, b: torch.Tensor, bw: float) -> float:
    def k(u, v):
        return math.exp(-float(((u - v) ** 2).sum()) / bw)
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m)) / m ** 2
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n)) / n ** 2
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_matches_slow_reference_and_its_permutations():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 3, generator=g), torch.randn(9, 3, generator=g) + 0.5
    bw = median_bandwidth(torch.cat([a, b]))
    z = torch.cat([a, b]).double()
    assert mmd2(gaussian_kernel(z, bandwidth=bw), 12) == pytest.approx(_slow_mmd2(a.double(), b.double(), bw),
                                                                        rel=1e-5)
    # the p-value is (k + 1) / (B + 1) with k the relabellings (same generator draws) at least as extreme
    res = mmd_permutation_test(a, b, bandwidth=bw, permutations=49, generator=torch.Generator().manual_seed(7))
    order = torch.rand(49, 21, generator=torch.Generator().manual_seed(7)).argsort(1)
    k = sum(_slow_mmd2(z[o < 12], z[o >= 12], bw) >= res.statistic - 1e-7 for o in order)  # o[j] < 12: j is 'ref'
    assert res.p_value == pytest.approx((k + 1) / 50)
    assert res.statistic == pytest.approx(_slow_mmd2(a.double(), b.double(), bw), rel=1e-5)


def test_mmd_level_under_the_null_and_power_under_a_shift():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(200, 8, generator=g)
    bw = median_bandwidth(ref)
    null = [mmd_permutation_test(ref, torch.randn(50, 8, generator=g), bandwidth=bw, permutations=99,
                                 generator=g).p_value for _ in range(200)]
    assert all(p >= 1 / 100 for p in null)
    rate = sum(p <= 0.05 for p in null) / len(null)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)  # the test's level, within 3 standard errors
    shifted = mmd_permutation_test(ref, torch.randn(50, 8, generator=g) + 0.5, bandwidth=bw, permutations=99,
                                   generator=g)
    assert shifted.p_value == pytest.approx(1 / 100)


def test_one_window_test_costs_under_250_ms():
    g = torch.Generator().manual_seed(2)
    ref, x = torch.randn(1000, 128, generator=g), torch.randn(200, 128, generator=g)
    test = MMDPermutationTest(ref, permutations=199)  # as the service holds it: the reference's block precomputed
    test(x, generator=g)  # warm-up
    t0 = time.perf_counter()
    test(x, generator=g)
    chi2_homogeneity(torch.randint(0, 10, (1000,)).bincount(minlength=10), torch.randint(0, 10, (200,)).bincount())
    assert time.perf_counter() - t0 < 0.25


def test_chi2_matches_scipy_and_drops_empty_classes():
    from scipy.stats import chi2_contingency

    ref, win = torch.tensor([50, 40, 0, 10]), torch.tensor([20, 30, 0, 2])
    res = chi2_homogeneity(ref, win)
    stat, p, dof, _ = chi2_contingency([[50, 40, 10], [20, 30, 2]], correction=False)
    assert res.statistic == pytest.approx(stat) and res.p_value == pytest.approx(p) and dof == 2
    assert res.n == 52
    assert chi2_homogeneity(torch.tensor([5, 0]), torch.tensor([3, 0])).p_value == 1.0
    assert chi2_homogeneity(torch.tensor([100, 100]), torch.tensor([100, 0])).p_value < 1e-10


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="m x D and n x D"):
        mmd_permutation_test(torch.zeros(5, 3), torch.zeros(5, 4), bandwidth=1.0)
