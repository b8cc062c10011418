"""Transfer attack: craft adversarial examples on a surrogate model the attacker trains, evaluate them on the target
(the transferability setting of Papernot, McDaniel & Goodfellow, "Transferability in Machine Learning: from
Phenomena to Black-Box Attacks using Adversarial Samples", arXiv:1605.07277, 2016).

Not Papernot et al., "Practical Black-Box Attacks against Machine Learning" (AsiaCCS 2017): that substitute is
trained with Jacobian-based dataset augmentation (new queries along the substitute's Jacobian); this surrogate
learns from the training set's labels or from one label query per (unaugmented) image."""
from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import nn

from safedl import registry
from safedl.attacks.base import EvasionAttack
from safedl.attacks.query import QueryInterface
from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.models import TrainRecipe, build_model, model_names, train_model, with_normalization
from safedl.utils.validate import check_choice, check_positive

log = logging.getLogger(__name__)
_CHUNK = 4096


@registry.register("evasion", "transfer")
class TransferAttack(EvasionAttack):
    """Train a zoo ``surrogate`` and run a white-box ``attack`` from the registry on it; the target is never
    differentiated.

    ``source="train"``: the surrogate learns the training set's true labels (attacker with the data).
    ``source="queries"``: it learns the target's predicted labels on at most ``max_queries`` training images, each
    queried once through the label-only query interface (attacker with unlabelled data and a query budget).
    ``fit(train, model=..., device=...)`` trains the surrogate; if the attack is called unfitted, the surrogate is
    trained on the attacked images themselves with labels queried from the target (one query per image, within
    ``max_queries``). ``queries_`` counts per-sample queries at attack time; ``fit_queries_`` the total spent in fit.
    """

    access: ClassVar[str] = "transfer"
    conformance_params: ClassVar[dict] = {"surrogate": "tiny_cnn", "epochs": 30, "eps": 0.3,
                                          "attack_params": {"steps": 10}}

    def __init__(self, *, surrogate: str = "small_cnn", source: str = "train", max_queries: int = 5000,
                 attack: str = "pgd", attack_params: dict | None = None, eps: float = 0.3, norm: str = "linf",
                 epochs: int = 8, lr: float = 1e-3, seed: int = 0):
        self._init_norm_eps(norm, eps)
        self.surrogate = check_choice(self, "surrogate", surrogate, model_names())
        self.source = check_choice(self, "source", source, ("train", "queries"))
        self.max_queries = check_positive(self, "max_queries", max_queries, integer=True)
        self.epochs = check_positive(self, "epochs", epochs, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.seed = int(seed)
        self.attack = check_choice(self, "attack", attack, [n for n in registry.names("evasion")
                                                            if registry.get("evasion", n).access == "white-box"])
        self.attack_params = attack_params
        given = dict(attack_params or {})
        accepted = {p.name for p in registry.params("evasion", attack)}
        inner = {k: v for k, v in (("eps", self.eps), ("norm", self.norm)) if k in accepted}
        for k, v in inner.items():
            if k in given and given[k] != v:
                raise ConfigError(f"transfer: attack_params.{k}={given[k]!r} conflicts with {k}={v!r}; "
                                  f"set the budget on the transfer attack itself")
        self._inner = registry.create("evasion", attack, **{**given, **inner})
        if not getattr(self._inner, "bounded", True):
            raise ConfigError(f"transfer: attack={attack!r} minimises the perturbation and has no eps budget; "
                              f"choose a bounded white-box attack")

    def fit(self, train: Dataset, *, model: nn.Module, device: torch.device | str = "cpu") -> "TransferAttack":
        """Train the surrogate on ``train`` (true labels) or on the target's labels for up to max_queries images."""
        device = torch.device(device)
        x = train.x
        if self.source == "queries":
            g = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(len(x), generator=g)[: self.max_queries]
            x = x[pick]
            labels, used = self._query_labels(model, x.to(device))
            self.fit_queries_ = used
            data = Dataset(x, labels.cpu(), train.num_classes, name=f"{train.name}+target-labels")
        else:
            self.fit_queries_ = 0
            data = train
        self.surrogate_ = self._train(data, device)
        return self

    def _query_labels(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        qi = QueryInterface(model, n=len(x), output="labels", budget=1, device=x.device)
        idx = torch.arange(len(x), device=x.device)
        labels = torch.cat([qi(x[i:i + _CHUNK], idx[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
        return labels, int(qi.counts.sum())

    def _train(self, data: Dataset, device: torch.device) -> nn.Module:
        c, h, _ = data.shape
        mean = data.x.mean(dim=(0, 2, 3)).tolist()
        std = data.x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        torch.manual_seed(self.seed)
        net = build_model(self.surrogate, in_channels=c, num_classes=data.num_classes, image_size=h)
        model = with_normalization(net, mean, std)
        recipe = TrainRecipe(epochs=self.epochs, lr=self.lr, augment="none" if h < 16 else "shift")
        train_model(model, data, recipe=recipe, seed=self.seed, device=device, description="surrogate")
        return model.eval()

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
        if getattr(self, "surrogate_", None) is None:
            log.warning("transfer: surrogate not fitted; training it on the attacked images with queried labels")
            m = min(len(x), self.max_queries)
            labels, used = self._query_labels(model, x[:m])
            queries[:m] = 1
            k = int(max(labels.max(), y.max())) + 1
            self.fit_queries_ = used
            self.surrogate_ = self._train(Dataset(x[:m].cpu(), labels.cpu(), k, name="attacked-images"), x.device)
        surrogate = self.surrogate_.to(x.device)
        x_adv = self._inner(surrogate, x, y, target=target)
        self.queries_ = queries
        return x_adv
