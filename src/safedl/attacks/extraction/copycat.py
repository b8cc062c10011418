"""Copycat / Knockoff extraction (Correia-Silva et al., "Copycat CNN", IJCNN 2018; Orekondy, Schiele & Fritz,
"Knockoff Nets: Stealing Functionality of Black-Box Models", CVPR 2019)."""
from __future__ import annotations

from typing import Sequence

import torch

from safedl.attacks.extraction.base import ExtractionAttack, ExtractionOracle, ExtractionResult
from safedl.models.train import random_shift
from safedl.registry import register

_CHUNK = 512


@register("extraction", "copycat")
class Copycat(ExtractionAttack):
    """Query the victim on the attacker's own natural images, train a surrogate on its answers.

    Images are drawn from ``pool`` ("train"/"val": that split's images without their labels, i.e. an attacker with
    same-distribution data; or another built-in data set, resized) in a seeded random order, one query each, until
    the oracle's budget is spent (Knockoff's "random" sampling strategy). When the budget exceeds the pool, the
    remaining queries are random 2-pixel shifts of pool images (our addition, so a budget larger than the pool is
    still spent on natural-looking images). Scores are learned as soft labels, labels with cross-entropy.
    ``budgets`` is the query-budget curve the assessment measures; ``transfer_eps`` the L-inf budget of the PGD
    examples crafted on the stolen model to test transfer to the victim.
    """

    def __init__(self, *, surrogate: str = "small_cnn", surrogate_params: dict | None = None, epochs: int = 10,
                 lr: float = 1e-3, batch_size: int = 64, pool: str = "train",
                 budgets: Sequence[int] = (250, 500, 1000, 2000, 4000), transfer_eps: float = 0.3, seed: int = 0):
        self._init_surrogate(surrogate=surrogate, surrogate_params=surrogate_params, epochs=epochs, lr=lr,
                             batch_size=batch_size, seed=seed)
        self._init_common(budgets=budgets, pool=pool, transfer_eps=transfer_eps)

    def choose_queries(self, pool: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` images the attacker sends: a seeded permutation of the pool, then shifted copies if needed."""
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(pool), generator=g)
        x = pool[order[:n]]
        if n > len(pool):
            extra = pool[torch.randint(len(pool), (n - len(pool),), generator=g)]
            x = torch.cat([x, random_shift(extra, 2, g)])
        return x

    def extract(self, oracle: ExtractionOracle, pool: torch.Tensor, *, num_classes: int,
                device: torch.device | str = "cpu") -> ExtractionResult:
        device = torch.device(device)
        x = self.choose_queries(pool, oracle.remaining).to(device)
        answers = torch.cat([oracle(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
        surrogate = self.fresh_surrogate(tuple(pool.shape[1:]), num_classes, pool).to(device)
        self.train_surrogate(surrogate, x, answers, oracle.output, num_classes=num_classes, device=device)
        return ExtractionResult(surrogate, oracle.log())
