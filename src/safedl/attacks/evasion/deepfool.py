"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool deep neural
networks", CVPR 2016), L2 and L-inf."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from safedl.attacks.base import NORMS, EvasionAttack
from safedl.attacks.evasion._lp import project
from safedl.registry import register
from safedl.utils.tensors import predict_logits
from safedl.utils.validate import check_choice, check_positive


@register("evasion", "deepfool")
class DeepFool(EvasionAttack):
    """Iterative linearisation: step to the nearest linearised decision boundary among the ``candidates``
    highest-scoring classes (L2: along w / ||w||_2^2; L-inf: along sign(w) / ||w||_1), accumulate the steps, and
    overshoot the total by (1 + overshoot) until the label changes.

    Unbounded (minimises the perturbation) unless ``eps`` is given, in which case the result is projected onto the
    eps-ball. A ``target`` makes it step towards that class's boundary only.
    """

    conformance_params: ClassVar[dict] = {"steps": 20}

    def __init__(self, *, norm: str = "l2", steps: int = 50, overshoot: float = 0.02, candidates: int = 10,
                 eps: float | None = None):
        self.norm = check_choice(self, "norm", norm, NORMS)
        self.steps = check_positive(self, "steps", steps, integer=True)
        self.overshoot = float(check_positive(self, "overshoot", overshoot, allow_zero=True))
        self.candidates = check_positive(self, "candidates", candidates, integer=True)
        self.eps = None if eps is None else float(check_positive(self, "eps", eps))

    @property
    def bounded(self) -> bool:
        return self.eps is not None

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        n, view = len(x), (-1,) + (1,) * (x.ndim - 1)
        z0 = predict_logits(model, x)
        k = min(self.candidates, z0.shape[1])
        # candidate classes: the k highest clean logits (true label excluded below), or just the target
        cand = z0.argsort(1, descending=True)[:, :k] if target is None else target.view(-1, 1)
        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.arange(n, device=x.device)
        for _ in range(self.steps + 1):
            xa = x_adv[active].clone().requires_grad_(True)
            z = model(xa)
            ya, ca = y[active], cand[active]
            pred = z.argmax(1)
            done = pred != ya if target is None else pred == target[active]
            if bool(done.all()):
                break
            keep = ~done
            zy = z.gather(1, ya.view(-1, 1))
            gy, = torch.autograd.grad(zy.sum(), xa, retain_graph=True)
            f = z.gather(1, ca) - zy  # n x k
            dists, ws = [], []
            for j in range(ca.shape[1]):
                gj, = torch.autograd.grad(z.gather(1, ca[:, j:j + 1]).sum(), xa, retain_graph=j < ca.shape[1] - 1)
                w = (gj - gy).detach()
                wn = w.flatten(1).norm(p=2 if self.norm == "l2" else 1, dim=1)
                d = f[:, j].detach().abs() / (wn + 1e-8)
                d = torch.where(ca[:, j] == ya, torch.full_like(d, float("inf")), d)
                dists.append(d)
                ws.append(w)
            dists_t = torch.stack(dists, 1)
            best = dists_t.argmin(1)
            w = torch.stack(ws, 1)[torch.arange(len(best), device=x.device), best]
            fb = f.detach().gather(1, best.view(-1, 1)).squeeze(1).abs()
            if self.norm == "l2":
                r = (fb + 1e-4).view(view) / (w.flatten(1).pow(2).sum(1).view(view) + 1e-8) * w
            else:
                r = (fb + 1e-4).view(view) / (w.flatten(1).abs().sum(1).view(view) + 1e-8) * w.sign()
            idx = active[keep]
            r_tot[idx] = r_tot[idx] + r[keep]
            x_adv[idx] = (x[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1)
            active = idx
        if self.eps is not None:
            x_adv = (x + project(x_adv - x, self.norm, self.eps)).clamp(0, 1)
        return x_adv
