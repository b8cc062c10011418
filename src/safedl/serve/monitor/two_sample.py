"""Two-sample tests for drift detection, as batched tensor code.

- :func:`mmd_permutation_test`: the (biased, V-statistic) squared maximum mean discrepancy with a Gaussian kernel
  (Gretton et al. 2012, "A Kernel Two-Sample Test", JMLR 13) and a permutation test: the statistic of B random
  relabellings of the pooled sample, p = (k + 1) / (B + 1) with k the relabellings at least as extreme (Phipson &
  Smyth 2010), so p is never 0 and P(p <= alpha) <= alpha under exchangeability. All B statistics come from one
  kernel matrix: MMD^2 = w'Kw with w = +1/m on the reference and -1/n on the window, so B permutations are one
  (B x N) @ (N x N) product.
- :func:`chi2_homogeneity`: Pearson's chi-square test of homogeneity of two count vectors (a 2 x K contingency
  table; classes absent from both are dropped), p from the chi-square distribution with K' - 1 degrees of freedom.
- :func:`median_bandwidth`: the median heuristic for the kernel width (Gretton et al. 2012, section 8).

alibi-detect's PyTorch MMD detector does the same test; it is not used because installing it downgrades numpy
(2.x -> 1.26) and pulls numba, OpenCV and transformers into the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TestResult:
    """One test: its statistic, p-value and the size of the tested window."""

    statistic: float
    p_value: float
    n: int


def median_bandwidth(x: torch.Tensor, *, max_points: int = 1000) -> float:
    """The median squared pairwise distance of (the first ``max_points`` rows of) ``x``: the kernel is
    exp(-||a - b||^2 / bandwidth)."""
    x = x[:max_points].double()
    d2 = torch.cdist(x, x).pow(2)
    off = d2[~torch.eye(len(x), dtype=torch.bool)]
    med = float(off.median()) if off.numel() else 1.0
    return med if med > 0 else 1.0


def gaussian_kernel(z: torch.Tensor, *, bandwidth: float) -> torch.Tensor:
    """N x N kernel matrix exp(-||z_i - z_j||^2 / bandwidth)."""
    return torch.exp(-torch.cdist(z, z).pow_(2) / bandwidth)


def _weights(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([torch.full((m,), 1.0 / m, dtype=dtype), torch.full((n,), -1.0 / n, dtype=dtype)])


def mmd2(kernel: torch.Tensor, m: int) -> float:
    """Biased MMD^2 of the first ``m`` points against the rest, from their pooled kernel matrix."""
    w = _weights(m, len(kernel) - m, kernel.dtype)
    return float(w @ kernel @ w)


class MMDPermutationTest:
    """The MMD permutation test against a fixed reference (m x D): the reference's own kernel block is computed
    once, so a window of n images costs its m x n and n x n blocks plus the (B x N) @ (N x N) product."""

    def __init__(self, ref: torch.Tensor, *, bandwidth: float | None = None, permutations: int = 199):
        if ref.ndim != 2 or len(ref) < 2:
            raise ValueError(f"MMDPermutationTest: the reference must be m x D with m >= 2, got {tuple(ref.shape)}")
        if permutations < 1:
            raise ValueError(f"MMDPermutationTest: permutations must be >= 1, got {permutations}")
        self.ref = ref.float().contiguous()
        self.bandwidth = float(bandwidth) if bandwidth is not None else median_bandwidth(self.ref)
        self.permutations = int(permutations)
        self._k_rr = gaussian_kernel(self.ref, bandwidth=self.bandwidth)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (torch.cdist(self.ref, x).pow_(2), torch.cdist(x, x).pow_(2))
        k_rx, k_xx = (torch.exp(-d / self.bandwidth) for d in d2)
        return torch.cat([torch.cat([self._k_rr, k_rx], 1), torch.cat([k_rx.T, k_xx], 1)])

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> TestResult:
        """MMD^2 of the window ``x`` (n x D) against the reference and its p-value (k + 1) / (B + 1)."""
        if x.ndim != 2 or x.shape[1] != self.ref.shape[1] or len(x) < 2:
            raise ValueError(f"mmd_permutation_test: need m x D and n x D samples (m, n >= 2), got "
                             f"{tuple(self.ref.shape)} and {tuple(x.shape)}")
        m, n = len(self.ref), len(x)
        k = self._kernel(x.float())
        w0 = _weights(m, n, k.dtype)
        observed = float(((w0 @ k) * w0).sum())
        order = torch.rand(self.permutations, m + n, generator=generator).argsort(1)
        w = w0[order]                              # B x N: row b gives point j the weight of label order[b, j]
        stats = ((w @ k) * w).sum(1)
        hits = int((stats >= observed).sum())
        return TestResult(statistic=observed, p_value=(hits + 1) / (self.permutations + 1), n=n)


def mmd_permutation_test(ref: torch.Tensor, x: torch.Tensor, *, bandwidth: float, permutations: int = 199,
                         generator: torch.Generator | None = None) -> TestResult:
    """MMD^2 of ``x`` (n x D) against ``ref`` (m x D) and its permutation p-value (B = ``permutations``)."""
    if ref.ndim != 2 or x.ndim != 2 or ref.shape[1] != x.shape[1] or len(ref) < 2 or len(x) < 2:
        raise ValueError(f"mmd_permutation_test: need m x D and n x D samples (m, n >= 2), got {tuple(ref.shape)} "
                         f"and {tuple(x.shape)}")
    return MMDPermutationTest(ref, bandwidth=bandwidth, permutations=permutations)(x, generator=generator)


def chi2_homogeneity(ref_counts: torch.Tensor, counts: torch.Tensor) -> TestResult:
    """Pearson's chi-square test that two count vectors (K classes) come from one distribution."""
    from scipy.stats import chi2

    table = torch.stack([ref_counts.double(), counts.double()])
    table = table[:, table.sum(0) > 0]
    n = int(counts.sum())
    if table.shape[1] < 2 or n == 0 or float(table[0].sum()) == 0:
        return TestResult(statistic=0.0, p_value=1.0, n=n)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return TestResult(statistic=stat, p_value=float(chi2.sf(stat, table.shape[1] - 1)), n=n)
