"""Sparse-RS, the L0 (pixel) threat model (Croce, Andriushchenko, Singh, Flammarion & Hein, "Sparse-RS: a
versatile framework for query-efficient sparse black-box adversarial attacks", AAAI 2022), score-based."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.attacks.evasion._losses import margin
from safedl.attacks.evasion.square import p_selection
from safedl.attacks.query import QueryInterface
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive


def changed_pixels(x: torch.Tensor, x_adv: torch.Tensor, *, tol: float = 1e-7) -> torch.Tensor:
    """Per sample, how many pixels (positions, any channel) differ between ``x`` and ``x_adv`` (the L0 norm)."""
    return ((x_adv - x).abs() > tol).any(1).flatten(1).sum(1)


def random_pixel_values(n: int, c: int, m: int, gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """``n x c x m`` colours drawn uniformly from the corners {0, 1}^c (the paper's sampling of pixel values)."""
    return torch.randint(0, 2, (n, c, m), generator=gen, device=like.device).to(like.dtype)


def random_subset(mask: torch.Tensor, m: int, gen: torch.Generator | None) -> torch.Tensor:
    """Per row of the boolean ``mask`` (n x P), indices (n x m) of ``m`` uniformly drawn True positions."""
    keys = torch.rand(mask.shape, generator=gen, device=mask.device).masked_fill(~mask, -1.0)
    return keys.topk(m, dim=1).indices


@register("evasion", "sparse_rs")
class SparseRS(EvasionAttack):
    """Random search over sets of exactly ``k`` perturbed pixels (the L0 threat: at most ``k`` pixel positions,
    each set to a corner of the colour cube, all channels at once). It starts from ``k`` random pixels with random
    corner colours; each iteration swaps ``max(1, round(alpha * k))`` perturbed pixels (restored to their clean
    values) for as many unperturbed ones (given new random corner colours), ``alpha`` following the paper's
    piecewise-halving schedule from ``alpha_init``. A candidate is kept only when it lowers the margin of the
    returned scores (log-probabilities), as in the paper. One query per iteration per sample still unbroken; never
    more than ``max_queries`` per sample (``queries_`` holds the counts). ``norm`` is ``"l0"`` and ``eps`` is 0:
    there is no L-p ball, the budget is ``k`` pixels (``threat()`` says so). With ``with_penalty(p)`` (our
    detector-aware variant) the searched objective is ``max(margin, 0) + p(x')``: a candidate must also lower the
    penalty, and a sample is done only when it is misclassified with zero penalty.
    """

    access: ClassVar[str] = "scores"
    takes_penalty: ClassVar[bool] = True
    conformance_params: ClassVar[dict] = {"k": 8, "max_queries": 100}

    def __init__(self, *, k: int = 10, max_queries: int = 1000, alpha_init: float = 0.3, seed: int | None = 0):
        self.k = check_positive(self, "k", k, integer=True)
        self.max_queries = check_positive(self, "max_queries", max_queries, integer=True)
        self.alpha_init = float(check_fraction(self, "alpha_init", alpha_init))
        self.seed = seed
        self.norm = "l0"

    def threat(self) -> dict:
        """The threat model in words and numbers, for the results entry."""
        return {"kind": "l0", "pixels": self.k,
                "description": f"at most {self.k} pixel positions changed (all channels), no L-p bound"}

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = x.shape
        p_total = h * w
        k = min(self.k, p_total)
        gen = make_generator(self.seed, x.device)
        qi = QueryInterface(model, n=n, output="scores", budget=self.max_queries, device=x.device)

        def loss(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            logp = qi(xq, idx).clamp_min(1e-30).log()
            m = margin(logp, y[idx], None if target is None else target[idx])
            if self._penalty is None:
                return m
            with torch.no_grad():  # with_penalty: a success must also bring the penalty (e.g. detectors) to zero
                return m.clamp_min(0) + self._penalty(xq)

        flat = x.flatten(2)  # n x c x P
        mask = torch.zeros(n, p_total, dtype=torch.bool, device=x.device)
        first = random_subset(~mask, k, gen)
        mask.scatter_(1, first, True)
        adv = flat.clone()
        adv.scatter_(2, first.unsqueeze(1).expand(n, c, k), random_pixel_values(n, c, k, gen, x))
        all_idx = torch.arange(n, device=x.device)
        m_best = loss(adv.view_as(x), all_idx)
        for it in range(self.max_queries - 1):
            idx = all_idx[(m_best > 0) & (qi.remaining() > 0)]
            if len(idx) == 0 or k == p_total:
                break
            swap = max(1, int(round(p_selection(self.alpha_init, it, self.max_queries) * k)))
            swap = min(swap, k, p_total - k)
            cand, cand_mask = self._swap(flat[idx], adv[idx], mask[idx], swap, gen)
            m_new = loss(cand.view(len(idx), c, h, w), idx)
            better = m_new < m_best[idx]
            adv[idx[better]] = cand[better]
            mask[idx[better]] = cand_mask[better]
            m_best[idx[better]] = m_new[better]
        self.queries_ = qi.counts.clone()
        return adv.view_as(x)

    @staticmethod
    def _swap(flat: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, swap: int, gen
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Restore ``swap`` perturbed pixels and perturb ``swap`` clean ones (random corner colours), per row."""
        n, c, _ = flat.shape
        out_idx = random_subset(mask, swap, gen)
        in_idx = random_subset(~mask, swap, gen)
        cand = adv.clone()
        cand.scatter_(2, out_idx.unsqueeze(1).expand(n, c, swap), flat.gather(2, out_idx.unsqueeze(1).expand(n, c, swap)))
        cand.scatter_(2, in_idx.unsqueeze(1).expand(n, c, swap), random_pixel_values(n, c, swap, gen, flat))
        cand_mask = mask.clone()
        cand_mask.scatter_(1, out_idx, False)
        cand_mask.scatter_(1, in_idx, True)
        return cand, cand_mask

