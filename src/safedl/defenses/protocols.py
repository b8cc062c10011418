"""One protocol per defense kind, written down once. Handlers and the deployed pipeline rely on these, never on
component names or ``hasattr`` probes. Every registered component also carries ``registry_kind``,
``registry_name``, and ``registry.creation_params(component)`` gives the keyword arguments it was created with.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PreprocessorProtocol(Protocol):
    """``nn.Module`` mapping images in [0, 1] to images of the same shape.

    ``differentiable``: autograd through ``forward`` is useful (else adaptive attacks use BPDA through
    ``approximation``); ``randomized``: fresh randomness per call (adaptive attacks use EOT)."""

    differentiable: ClassVar[bool]
    randomized: ClassVar[bool]

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def approximation(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PostprocessorProtocol(Protocol):
    """``nn.Module`` mapping logits (N x K) to non-negative scores (N x K) shown to the caller.

    ``preserves_argmax``: the top-1 label is the model's, so only the information in the scores changes."""

    preserves_argmax: ClassVar[bool]

    def forward(self, logits: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class DetectorProtocol(Protocol):
    """Adversarial-input detector: higher score = more suspicious, True = flagged.

    ``fit(x_clean, *, model, y, x_calibration, seed) -> self`` sets ``threshold_`` (clean FPR ``fpr`` on the
    calibration images) and ``score_scale_`` (clean score spread); ``score_torch`` is differentiable so adaptive
    attacks can descend it."""

    fpr: float
    threshold_: float
    score_scale_: float

    def fit(self, x_clean: torch.Tensor, *, model: nn.Module, y: torch.Tensor | None = None,
            x_calibration: torch.Tensor | None = None, seed: int = 0, **kwargs: Any) -> Any: ...

    def score(self, x: torch.Tensor) -> torch.Tensor: ...

    def score_torch(self, x: torch.Tensor) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def threshold_at(self, fpr: float) -> float: ...


@runtime_checkable
class TrainerProtocol(Protocol):
    """Robust training: ``fit(model, data, *, recipe, seed, device, val) -> model`` returns the model to use
    (which may be a new object, e.g. DP training's); ``report()`` returns facts for results.json."""

    def fit(self, model: nn.Module, data: Any, *, recipe: Any, seed: int, device: Any = "cpu",
            val: Any = None) -> nn.Module: ...


@runtime_checkable
class CertifierProtocol(Protocol):
    """A certified classifier around a base model: ``fit`` trains the base model (same signature as a trainer),
    ``with_model`` adopts a trained one, ``predict(x) -> labels`` (-1 = abstain), ``vote_shares(x)`` the smoothed
    class probabilities, ``certified_accuracy(x, y, radii)``."""

    def fit(self, model: nn.Module, data: Any, *, recipe: Any, seed: int, device: Any = "cpu",
            val: Any = None) -> nn.Module: ...

    def with_model(self, model: nn.Module) -> Any: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def certified_accuracy(self, x: torch.Tensor, y: torch.Tensor, radii: Any) -> dict: ...


EVASION_PROTOCOLS: dict[str, type] = {
    "preprocessor": PreprocessorProtocol,
    "postprocessor": PostprocessorProtocol,
    "detector": DetectorProtocol,
    "trainer": TrainerProtocol,
    "certifier": CertifierProtocol,
}
