"""Reverse sigmoid (Lee, Edraki, Qi, "Defending Against NN Model Stealing Attacks Using Deceptive Perturbations",
IEEE S&P Workshops 2019)."""
from __future__ import annotations

import torch

from safedl.defenses.postprocess._base import Postprocessor
from safedl.registry import register
from safedl.utils.validate import check_positive


@register("postprocessor", "reverse_sigmoid")
class ReverseSigmoid(Postprocessor):
    """p' = normalize(p - beta * (sigmoid(gamma * logit(p)) - 1/2)).

    The perturbation pushes each probability toward the value whose logit the attacker would have to invert, which
    poisons the gradient information of soft labels; large ``beta`` can reorder classes, so argmax is not guaranteed.
    """

    preserves_argmax = False

    def __init__(self, *, beta: float = 1.0, gamma: float = 0.1):
        super().__init__()
        self.beta = float(check_positive(self, "beta", beta))
        self.gamma = float(check_positive(self, "gamma", gamma))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(1).clamp(1e-6, 1 - 1e-6)
        inv = torch.log(p / (1 - p))  # sigmoid^-1(p)
        r = self.beta * (torch.sigmoid(self.gamma * inv) - 0.5)
        out = (p - r).clamp_min(0)
        total = out.sum(1, keepdim=True)
        # if every entry was clipped, fall back to the unperturbed probabilities (no information added)
        return torch.where(total > 0, out / total.clamp_min(1e-12), p)
