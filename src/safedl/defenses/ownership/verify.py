"""Is a suspect model a copy? DAWN's verification (Szyller et al. 2021) on the watermarked queries the suspected
copier sent, as an exact test against what any model not trained on the watermarked answers does by chance:
a binomial test on the suspect's labels, or (our addition, when the suspect answers scores) a rank-sum test on
where the suspect ranks the watermark class."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from safedl.defenses.ownership.dawn import ResponseWatermark
from safedl.errors import UserError

EXACT_RANK_MAX_N = 2000  #: above this many watermarked images the rank-sum null is the normal approximation


@dataclass(frozen=True)
class OwnershipVerdict:
    """``n`` watermarked queries in the evidence, ``matches`` of them answered with the watermark label by the
    suspect, ``chance`` the most an independent model matches per query, ``p_value`` of the ``test`` ("label":
    P[Binomial(n, chance) >= matches]; "rank": P[sum of n uniform ranks <= ``rank_sum``]), ``copy`` whether
    p < ``alpha``."""

    n: int
    matches: int
    chance: float
    p_value: float
    alpha: float
    test: str = "label"
    rank_sum: int | None = None

    @property
    def copy(self) -> bool:
        return self.p_value < self.alpha

    def text(self) -> str:
        verdict = "COPY (the suspect reproduces the watermark)" if self.copy else "not shown to be a copy"
        how = ("binomial test on its labels" if self.test == "label" else
               f"rank-sum test on its scores: watermark-class ranks sum to {self.rank_sum}, "
               f"{self.n * self.n_ranks_mean():.1f} expected by chance")
        return (f"watermarked queries: {self.n}; suspect gave the watermark label on {self.matches} "
                f"(chance at most {self.chance:.4f} each); {how}; p-value {self.p_value:.3g}; verdict: {verdict} "
                f"at alpha {self.alpha:g}")

    def n_ranks_mean(self) -> float:
        """The mean rank of the watermark class under H0, (K - 1 + 1) / 2 = K / 2 with K - 1 = 1 / chance."""
        return (1.0 / self.chance + 1.0) / 2.0


def rank_sum_p_value(rank_sum: int, *, n: int, m: int) -> float:
    """P[R_1 + ... + R_n <= rank_sum] for independent R_i uniform on {1, ..., m}: exact (convolution) up to
    ``EXACT_RANK_MAX_N`` terms, the normal approximation with continuity correction above."""
    from scipy.stats import norm

    if n > EXACT_RANK_MAX_N:
        mean, var = n * (m + 1) / 2.0, n * (m * m - 1) / 12.0
        return float(norm.cdf((rank_sum + 0.5 - mean) / var ** 0.5))
    pmf, one = np.ones(1), np.full(m, 1.0 / m)
    for _ in range(n):
        pmf = np.convolve(pmf, one)  # pmf[j] = P[sum = n + j]
    return float(min(1.0, pmf[:max(0, rank_sum - n + 1)].sum()))


def watermark_ranks(scores: torch.Tensor, victim: torch.Tensor, wm: torch.Tensor) -> torch.Tensor:
    """Per image, the rank (1 = highest score) of class ``wm`` among the classes other than ``victim`` in the
    suspect's ``scores``; ties go to the lower class index (any fixed order keeps the null exact)."""
    s = scores.detach().double().cpu().clone()
    s[torch.arange(len(s)), victim.cpu()] = -float("inf")
    order = torch.sort(-s, dim=1, stable=True).indices
    return (order == wm.cpu().unsqueeze(1)).float().argmax(1) + 1


def verify_ownership(*, watermark: ResponseWatermark, evidence: torch.Tensor, victim_labels: torch.Tensor,
                     suspect_labels: torch.Tensor | None = None, suspect_scores: torch.Tensor | None = None,
                     alpha: float = 0.01) -> OwnershipVerdict:
    """Test the suspect on the watermarked images among ``evidence`` (the queries the suspected copier sent).

    Under H0 (the suspect was not trained on the watermarked answers) the watermark label is a uniform draw among
    the K - 1 classes other than the victim's label, independent of the suspect (a keyed hash it does not know).
    So the suspect matches it with probability 1 / (K - 1) per image (binomial test on ``suspect_labels``), and,
    given ``suspect_scores`` (N x K), its rank among those K - 1 classes is uniform (rank-sum test: a copy that
    learned the watermarked answers only partly still ranks the watermark class high).
    """
    from scipy.stats import binom

    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise UserError(f"ownership: alpha = {alpha!r}; allowed: a number strictly between 0 and 1")
    if suspect_labels is None and suspect_scores is None:
        raise UserError("ownership: give the suspect's labels or its scores")
    if suspect_scores is not None:
        suspect_labels = suspect_scores.argmax(1)
    if not (len(evidence) == len(victim_labels) == len(suspect_labels)):
        raise UserError(f"ownership: evidence ({len(evidence)}), victim labels ({len(victim_labels)}) and suspect "
                        f"answers ({len(suspect_labels)}) must have one entry per image")
    mask, wm = watermark.select(evidence, victim_labels.cpu())
    n = int(mask.sum())
    if n == 0:
        raise UserError(f"ownership: none of the {len(evidence)} evidence images is watermarked (rate "
                        f"{watermark.rate:g}); give more of the suspected copier's queries")
    matches = int((suspect_labels.cpu()[mask] == wm[mask]).sum())
    m = watermark.num_classes - 1
    if suspect_scores is None:
        return OwnershipVerdict(n, matches, 1.0 / m, float(binom.sf(matches - 1, n, 1.0 / m)), a)
    ranks = watermark_ranks(suspect_scores[mask.to(suspect_scores.device)], victim_labels.cpu()[mask], wm[mask])
    s = int(ranks.sum())
    return OwnershipVerdict(n, matches, 1.0 / m, rank_sum_p_value(s, n=n, m=m), a, test="rank", rank_sum=s)
