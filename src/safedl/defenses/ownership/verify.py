"""Is a suspect model a copy? The share of watermarked queries on which it gives the watermark label, tested
against what an independent model can reach by chance (DAWN's verification, as an exact binomial test)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from safedl.defenses.ownership.dawn import ResponseWatermark
from safedl.errors import UserError


@dataclass(frozen=True)
class OwnershipVerdict:
    """``n`` watermarked queries in the evidence, ``matches`` of them answered with the watermark label by the
    suspect, ``chance`` the most an independent model matches per query, ``p_value`` P[Binomial(n, chance) >=
    matches], ``copy`` whether p < ``alpha``."""

    n: int
    matches: int
    chance: float
    p_value: float
    alpha: float

    @property
    def copy(self) -> bool:
        return self.p_value < self.alpha

    def text(self) -> str:
        verdict = "COPY (the suspect reproduces the watermark)" if self.copy else "not shown to be a copy"
        return (f"watermarked queries: {self.n}; suspect gave the watermark label on {self.matches} "
                f"(chance at most {self.chance:.4f} each); p-value {self.p_value:.3g}; verdict: {verdict} "
                f"at alpha {self.alpha:g}")


def verify_ownership(*, watermark: ResponseWatermark, evidence: torch.Tensor, victim_labels: torch.Tensor,
                     suspect_labels: torch.Tensor, alpha: float = 0.01) -> OwnershipVerdict:
    """Test the suspect on the watermarked images among ``evidence`` (the queries the suspected copier sent).

    Under H0 (the suspect was not trained on the watermarked answers) the watermark label is a uniform draw among
    the classes other than the victim's label, independent of the suspect, so the suspect matches it with
    probability at most 1 / (K - 1) per image.
    """
    from scipy.stats import binom

    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise UserError(f"ownership: alpha = {alpha!r}; allowed: a number strictly between 0 and 1")
    if not (len(evidence) == len(victim_labels) == len(suspect_labels)):
        raise UserError(f"ownership: evidence ({len(evidence)}), victim labels ({len(victim_labels)}) and suspect "
                        f"labels ({len(suspect_labels)}) must have one entry per image")
    mask, wm = watermark.select(evidence, victim_labels.cpu())
    n = int(mask.sum())
    if n == 0:
        raise UserError(f"ownership: none of the {len(evidence)} evidence images is watermarked (rate "
                        f"{watermark.rate:g}); give more of the suspected copier's queries")
    matches = int((suspect_labels.cpu()[mask] == wm[mask]).sum())
    chance = 1.0 / (watermark.num_classes - 1)
    return OwnershipVerdict(n, matches, chance, float(binom.sf(matches - 1, n, chance)), a)
