"""The black-box query interface: the only way score- and decision-based attacks see a model.

It returns probabilities (``output="scores"``) or labels only (``output="labels"``), counts every query per sample,
and refuses a query that would take any sample past its budget, so an attack can never exceed it silently.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from safedl.errors import QueryBudgetExceeded
from safedl.utils.tensors import eval_mode


class QueryInterface:
    """Counted black-box access to ``model`` for a batch of ``n`` samples.

    ``postprocess`` (logits -> scores), if given, stands for the deployed system's output hardening; without it,
    scores are softmax probabilities.
    """

    def __init__(self, model: nn.Module, *, n: int, output: str = "scores", budget: int | None = None,
                 postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, device: torch.device | None = None):
        if output not in ("scores", "labels"):
            raise ValueError(f"output must be 'scores' or 'labels', got {output!r}")
        self._model = model
        self.output = output
        self.budget = budget
        self._postprocess = postprocess
        self.counts = torch.zeros(n, dtype=torch.long, device=device)

    def remaining(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Queries left per sample (a large number when there is no budget)."""
        c = self.counts if idx is None else self.counts[idx]
        if self.budget is None:
            return torch.full_like(c, 2**62)
        return self.budget - c

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Query the model on ``x``; ``idx`` names which of the n samples each row belongs to (default: all, in order)."""
        if idx is None:
            idx = torch.arange(len(self.counts), device=self.counts.device)
        idx = idx.to(self.counts.device)
        if len(idx) != len(x):
            raise ValueError(f"{len(x)} inputs but {len(idx)} sample indices")
        if len(x) == 0:
            return torch.empty(0, device=x.device)
        new = self.counts.index_add(0, idx, torch.ones_like(idx))
        if self.budget is not None and bool((new[idx] > self.budget).any()):
            raise QueryBudgetExceeded(f"query budget of {self.budget} per sample would be exceeded")
        self.counts = new
        with eval_mode(self._model):
            logits = self._model(x)
        if self.output == "labels":
            return logits.argmax(1)
        return self._postprocess(logits) if self._postprocess is not None else logits.softmax(1)
