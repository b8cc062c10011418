"""Extraction-attack contract: the oracle (counted, budgeted black-box access), the query log and the result.

An extraction attack sees the victim only through an :class:`ExtractionOracle`, which wraps the same counted
:class:`~safedl.attacks.query.QueryInterface` the score- and decision-based evasion attacks use (one counter for the
whole attacker, so the budget is a total number of queried images) and answers with scores or labels as the threat
model allows. ``extract(oracle, pool, *, num_classes, device) -> ExtractionResult(surrogate, log)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safedl.attacks.query import QueryInterface
from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.models import TrainRecipe, build_model, model_names, train_model, with_normalization
from safedl.utils.validate import check_choice, check_positive


@dataclass
class QueryLog:
    """Every image the attacker sent (``x``, in order) and the answer it got (``answers``: N x K scores or N labels)."""

    x: torch.Tensor
    answers: torch.Tensor
    output: str

    def __len__(self) -> int:
        return len(self.x)

    def labels(self) -> torch.Tensor:
        """The victim's top-1 label for each logged query."""
        return self.answers if self.output == "labels" else self.answers.argmax(1)


@dataclass
class ExtractionResult:
    """The stolen model (``surrogate``, in eval mode) and the log of the queries that trained it."""

    surrogate: nn.Module
    log: QueryLog


class ExtractionOracle:
    """Budgeted black-box access to ``model`` for one attacker: ``oracle(x)`` answers scores or labels and logs it.

    ``postprocess`` stands for the deployed system's output hardening (logits -> scores). The budget is the total
    number of images; a query that would exceed it raises :class:`~safedl.errors.QueryBudgetExceeded`.
    """

    def __init__(self, model: nn.Module, *, budget: int, output: str = "scores",
                 postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | None = None):
        self._qi = QueryInterface(model, n=1, output=output, budget=int(budget), postprocess=postprocess,
                                  device=device)
        self.budget = int(budget)
        self._x: list[torch.Tensor] = []
        self._answers: list[torch.Tensor] = []

    @property
    def output(self) -> str:
        return self._qi.output

    @property
    def used(self) -> int:
        return int(self._qi.counts[0])

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros(len(x), dtype=torch.long, device=self._qi.counts.device)
        out = self._qi(x, idx)
        self._x.append(x.detach().cpu())
        self._answers.append(out.detach().cpu())
        return out

    def log(self) -> QueryLog:
        if not self._x:
            return QueryLog(torch.empty(0), torch.empty(0), self.output)
        return QueryLog(torch.cat(self._x), torch.cat(self._answers), self.output)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability vectors (rows renormalised: a top-k answer need not sum to one)."""
    p = target.clamp_min(0)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    return -(p * F.log_softmax(logits, 1)).sum(1).mean()


class ExtractionAttack:
    """Base of extraction attacks: validated surrogate config and the shared surrogate training.

    ``access`` is the least the attack needs (``"labels"``); with a scores interface the surrogate learns the
    returned probability vectors (soft labels), with labels only the top-1 labels.
    """

    access: ClassVar[str] = "labels"

    def _init_common(self, *, budgets: Sequence[int], pool: str, transfer_eps: float) -> None:
        from safedl.data.builtin import BUILTIN

        budgets = [int(check_positive(self, "budgets", b, integer=True)) for b in budgets]
        if not budgets or budgets != sorted(set(budgets)):
            raise ConfigError(f"{self.registry_name}: budgets must be a non-empty increasing list of query counts, "
                              f"got {budgets!r}")
        self.budgets = budgets
        self.pool = check_choice(self, "pool", pool, ("train", "val") + tuple(BUILTIN))
        self.transfer_eps = float(check_positive(self, "transfer_eps", transfer_eps))

    def _init_surrogate(self, *, surrogate: str, surrogate_params: dict | None, epochs: int, lr: float,
                        batch_size: int, seed: int) -> None:
        self.surrogate = check_choice(self, "surrogate", surrogate, model_names())
        self.surrogate_params = surrogate_params
        self.epochs = check_positive(self, "epochs", epochs, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)
        self.seed = int(seed)

    def extract(self, oracle: ExtractionOracle, pool: torch.Tensor, *, num_classes: int,
                device: torch.device | str = "cpu") -> ExtractionResult:
        raise NotImplementedError

    def params(self) -> dict:
        """The validated config (public attributes not ending in '_'; not the registry's own bookkeeping)."""
        return {k: v for k, v in vars(self).items() if not k.startswith(("_", "registry_")) and not k.endswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def fresh_surrogate(self, shape: tuple[int, ...], num_classes: int, pool: torch.Tensor) -> nn.Module:
        """A new surrogate network, normalised with the attacker's own pool statistics, seeded."""
        c, h = shape[0], shape[1]
        mean = pool.mean(dim=(0, 2, 3)).tolist()
        std = pool.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        torch.manual_seed(self.seed)
        net = build_model(self.surrogate, in_channels=c, num_classes=num_classes, image_size=h, **(self.surrogate_params or {}))
        return with_normalization(net, mean, std)

    def train_surrogate(self, model: nn.Module, x: torch.Tensor, answers: torch.Tensor, output: str, *,
                        num_classes: int, device: torch.device, epochs: int | None = None) -> nn.Module:
        """Fit ``model`` on the logged answers: soft cross-entropy on scores, cross-entropy on labels.

        Soft targets go through the shared training loop by passing row indices as the "labels" and looking the
        probability vectors up in the loss.
        """
        recipe = TrainRecipe(epochs=epochs or self.epochs, lr=self.lr, batch_size=self.batch_size, augment="none",
                             schedule="constant")  # constant: Jacobian rounds continue training the same model
        if output == "labels":
            data = Dataset(x, answers.long(), num_classes, name="stolen-labels")
            train_model(model, data, recipe=recipe, seed=self.seed, device=device, description="surrogate")
        else:
            targets = answers.float().to(device)
            data = Dataset(x, torch.arange(len(x)), num_classes, name="stolen-scores")

            def loss(m: nn.Module, xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                return soft_cross_entropy(m(xb), targets[rows])

            train_model(model, data, recipe=recipe, seed=self.seed, device=device, loss_fn=loss,
                        description="surrogate")
        return model.eval()
