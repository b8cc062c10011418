"""ART's PyTorchClassifier built around a safedl model: [0, 1] pixel space, ``clip_values=(0, 1)``, normalization
inside the model (ART's ``preprocessing`` stays the identity), cross-entropy loss."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from safedl.attacks.query import QueryInterface
from safedl.integrations.art.loader import import_art


class QueryModel(nn.Module):
    """A black-box view of a model for ART, attacking one sample: every forward goes through a counted
    :class:`QueryInterface` (``n=1``; each row of a batch is one query of that sample) and returns log-scores, so
    ART sees scores only and each query is counted."""

    def __init__(self, interface: QueryInterface, *, num_classes: int):
        super().__init__()
        self.interface = interface
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(len(x), dtype=torch.long, device=x.device)  # one sample at a time: every row is its query
        out = self.interface(x, rows)
        if self.interface.output == "labels":  # decision-based: ART reads the top-1 label of a one-hot vector
            out = torch.nn.functional.one_hot(out, self.num_classes).float()
        return out.clamp_min(1e-12).log()


class Float32(nn.Module):
    """Casts ART's inputs to float32 (some ART attacks, e.g. HopSkipJump, query with float64 arrays)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float())


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes the model outputs (one forward pass on one image)."""
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def art_classifier(model: nn.Module, *, input_shape: tuple[int, ...], nb_classes: int, device: torch.device) -> Any:
    """ART's ``PyTorchClassifier`` over ``model`` in [0, 1] pixel space."""
    classification = import_art("art.estimators.classification")
    return classification.PyTorchClassifier(
        model=Float32(model), loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape), nb_classes=int(nb_classes),
        clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu")


def probe_classifier() -> Any:
    """A tiny 2-class classifier on 1 x 2 x 2 images, so an ART attack's parameters can be validated at profile time
    (ART checks them in its constructor, which needs an estimator)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    return art_classifier(net, input_shape=(1, 2, 2), nb_classes=2, device=torch.device("cpu"))


@contextlib.contextmanager
def numpy_seed(seed: int | None) -> Iterator[None]:
    """Seed numpy's global RNG (which ART draws from) for the block, then restore its previous state."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(int(seed))
    try:
        yield
    finally:
        np.random.set_state(state)
