"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020), L-inf and L2, score-based."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import EvasionAttack, make_generator
from safedl.attacks.evasion._losses import margin
from safedl.attacks.query import QueryInterface
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive

# fractions of the query budget (in 1/10000) after which the square size p is halved again (the paper's schedule)
_P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels changed at iteration ``it``: p_init halved at each schedule point, rescaled to n_iters."""
    t = int(it / n_iters * 10000)
    return p_init / 2 ** sum(t > b for b in _P_SCHEDULE)


def _rect_pert(h: int, w: int) -> torch.Tensor:
    """Concentric rectangles with weights 1/(k+1)^2 around the centre, unit L2 norm (the paper's L2 update shape)."""
    d = torch.zeros(h, w)
    if h == 0 or w == 0:
        return d
    ch, cw = h // 2, w // 2
    for k in range(max(ch, cw) + 1):
        d[max(ch - k, 0):min(ch + k + 1, h), max(cw - k, 0):min(cw + k + 1, w)] += 1.0 / (k + 1) ** 2
    return d / d.norm()


def _meta_pert(s: int, gen: torch.Generator | None) -> torch.Tensor:
    """Two opposite-signed halves of rectangle perturbations, unit L2 norm, transposed with probability 1/2."""
    d = torch.zeros(s, s)
    d[: s // 2] = _rect_pert(s // 2, s)
    d[s // 2:] = -_rect_pert(s - s // 2, s)
    d = d / d.norm().clamp_min(1e-12)
    if float(torch.rand(1, generator=gen)) > 0.5:
        d = d.t()
    return d


@register("evasion", "square")
class SquareAttack(EvasionAttack):
    """Random search over square-shaped updates on the margin of the returned scores (log-probabilities, whose
    margin equals the logit margin); an update is kept only if it lowers the margin. L-inf: each square is set to
    +-eps per channel, from vertical-stripe initialisation. L2: mass is moved between two windows with
    pseudo-Gaussian square updates, the total norm kept at eps. The square size follows the paper's schedule from
    ``p_init`` (0.8 as in AutoAttack). One query per iteration per sample still unbroken; never more than
    ``max_queries`` per sample (``queries_`` holds the counts).
    """

    access: ClassVar[str] = "scores"
    conformance_params: ClassVar[dict] = {"eps": 0.3, "max_queries": 100}

    def __init__(self, *, eps: float = 0.3, norm: str = "linf", max_queries: int = 5000, p_init: float = 0.8,
                 seed: int | None = 0):
        self._init_norm_eps(norm, eps)
        self.max_queries = check_positive(self, "max_queries", max_queries, integer=True)
        self.p_init = float(check_fraction(self, "p_init", p_init))
        self.seed = seed

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        gen = make_generator(self.seed, x.device)
        cpu_gen = make_generator(self.seed, torch.device("cpu"))
        qi = QueryInterface(model, n=len(x), output="scores", budget=self.max_queries, device=x.device)

        def loss(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            logp = qi(xq, idx).clamp_min(1e-30).log()
            return margin(logp, y[idx], None if target is None else target[idx])

        n, c, h, w = x.shape
        all_idx = torch.arange(n, device=x.device)
        if self.norm == "linf":
            stripes = self._sign((n, c, 1, w), gen, x) * self.eps
            x_best = (x + stripes).clamp(0, 1)
        else:
            x_best = self._l2_init(x, gen, cpu_gen)
        m_best = loss(x_best, all_idx)
        for it in range(self.max_queries - 1):
            idx = all_idx[(m_best > 0) & (qi.remaining() > 0)]
            if len(idx) == 0:
                break
            p = p_selection(self.p_init, it, self.max_queries)
            if self.norm == "linf":
                x_new = self._linf_step(x[idx], x_best[idx], p, gen)
            else:
                x_new = self._l2_step(x[idx], x_best[idx], p, gen, cpu_gen)
            m_new = loss(x_new, idx)
            better = m_new < m_best[idx]
            x_best[idx[better]] = x_new[better]
            m_best[idx[better]] = m_new[better]
        self.queries_ = qi.counts.clone()
        return x_best

    @staticmethod
    def _sign(shape, gen, like: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype) * 2 - 1

    def _linf_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float, gen) -> torch.Tensor:
        n, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1)
        delta = x_best - x
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        vh = torch.randint(0, h - s, (n, 1, 1), generator=gen, device=x.device)
        vw = torch.randint(0, w - s, (n, 1, 1), generator=gen, device=x.device)
        win = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)).unsqueeze(1)  # n x 1 x h x w
        vals = self._sign((n, c, 1, 1), gen, x) * self.eps
        # redraw the colours of squares that would leave the image unchanged (as the paper's implementation does)
        for _ in range(8):
            same = (((x + vals).clamp(0, 1) - x_best).abs() < 1e-7) | ~win
            stale = same.flatten(1).all(1)
            if not bool(stale.any()):
                break
            vals = torch.where(stale.view(-1, 1, 1, 1), self._sign((n, c, 1, 1), gen, x) * self.eps, vals)
        return (x + torch.where(win, vals, delta)).clamp(0, 1)

    def _l2_init(self, x: torch.Tensor, gen, cpu_gen) -> torch.Tensor:
        """A grid of pseudo-Gaussian squares with random signs per sample and channel, scaled to norm eps."""
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        sp = (h - s * (h // s)) // 2
        for i in range(h // s):
            for j in range(w // s):
                pert = _meta_pert(s, cpu_gen).to(x)
                r0, c0 = sp + i * s, sp + j * s
                if r0 + s > h or c0 + s > w:
                    continue
                delta[:, :, r0:r0 + s, c0:c0 + s] += pert * self._sign((n, c, 1, 1), gen, x)
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + delta / norm * self.eps).clamp(0, 1)

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float, gen, cpu_gen) -> torch.Tensor:
        """Move the perturbation of a random window 2 into a new pseudo-Gaussian square in window 1."""
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + 1 if s % 2 == 0 else s, h - 1)
        delta = x_best - x
        h1, w1, h2, w2 = (int(v) for v in torch.randint(0, max(h - s, 1), (4,), generator=cpu_gen))
        mask1 = torch.zeros(1, 1, h, w, device=x.device, dtype=torch.bool)
        mask1[..., h1:h1 + s, w1:w1 + s] = True
        mask2 = torch.zeros_like(mask1)
        mask2[..., h2:h2 + s, w2:w2 + s] = True
        norm_win1 = (delta * mask1).pow(2).sum((2, 3), keepdim=True).sqrt()
        norm_img = delta.pow(2).sum((1, 2, 3), keepdim=True).sqrt()
        norm_both = (delta * (mask1 | mask2)).pow(2).sum((2, 3), keepdim=True).sqrt()
        new = _meta_pert(s, cpu_gen).to(x).view(1, 1, s, s) * self._sign((n, c, 1, 1), gen, x)
        new = new + delta[:, :, h1:h1 + s, w1:w1 + s] / (norm_win1 + 1e-10)
        # the budget left over plus what windows 1 and 2 held goes into window 1
        scale = ((self.eps ** 2 - norm_img ** 2).clamp_min(0) / c + norm_both ** 2).sqrt()
        new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * scale
        delta = delta.clone()
        delta[:, :, h2:h2 + s, w2:w2 + s] = 0
        delta[:, :, h1:h1 + s, w1:w1 + s] = new
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + delta / norm * self.eps).clamp(0, 1)
