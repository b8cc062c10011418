"""One protocol per defense kind, written down once. Handlers and the deployed pipeline rely on these, never on
component names or ``hasattr`` probes. Evasion side: preprocessor, postprocessor, detector, trainer, certifier;
poisoning side: cleanser, repair, inspector, trainer. Every registered component also carries ``registry_kind``,
``registry_name``, and ``registry.creation_params(component)`` gives the keyword arguments it was created with.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from safedl.data.dataset import Dataset
    from safedl.defenses.cleanse.result import DetectionResult


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
    attacks can descend it. ``sees_raw_input``: it is fitted on and scores the raw input, in front of the
    preprocessors (else it sees their output)."""

    fpr: float
    sees_raw_input: bool
    threshold_: float
    score_scale_: float

    def fit(self, x_clean: torch.Tensor, *, model: nn.Module, y: torch.Tensor | None = None,
            x_calibration: torch.Tensor | None = None, seed: int = 0, **kwargs: Any) -> Any: ...

    def score(self, x: torch.Tensor) -> torch.Tensor: ...

    def score_torch(self, x: torch.Tensor) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def threshold_at(self, fpr: float) -> float: ...


@runtime_checkable
class ForwardSharingDetectorProtocol(Protocol):
    """A detector whose score is a function of its model's logits on the input and on inputs derived from it, so
    a deployed pipeline can run those through the classifier's own forward pass (one batch, no second copy of
    the input's forward): ``model_inputs(x)`` gives the k*N derived inputs, ``score_from_logits(logits,
    derived_logits)`` the N scores from the model's logits on x (N x K) and on them (k*N x K)."""

    model_: nn.Module

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor: ...

    def score_from_logits(self, logits: torch.Tensor, derived_logits: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TrainerProtocol(Protocol):
    """Robust training: ``fit(model, data, *, recipe, seed, device, val) -> model`` returns the model to use
    (which may be a new object, e.g. DP training's); ``architecture(model)`` is the structure ``fit`` trains;
    ``facts()`` returns the numbers a run reports about the training (e.g. epsilon spent), for results.json."""

    def fit(self, model: nn.Module, data: Any, *, recipe: Any, seed: int, device: Any = "cpu",
            val: Any = None) -> nn.Module: ...

    def architecture(self, model: nn.Module) -> nn.Module: ...

    def facts(self) -> dict[str, Any]: ...


@runtime_checkable
class CertifierProtocol(Protocol):
    """A certified classifier around a base model: ``fit`` trains the base model (same signature as a trainer),
    ``with_model`` adopts a trained one, ``predict(x) -> labels`` (-1 = abstain), ``vote_shares(x)`` the smoothed
    class probabilities, ``certified_accuracy(x, y, radii)``; ``randomized``: whether the deployed prediction
    samples noise (randomized smoothing) or is the model's own label (IBP); ``norm``: the certificate's norm."""

    randomized: bool
    norm: str

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


#: what a cleanser may be given besides the data (it declares the subset it uses in ``inputs``)
CLEANSER_INPUTS = frozenset({"model", "trusted", "train_fn", "provenance"})
TrustedNeed = Literal["required", "optional", "unused"]


@runtime_checkable
class CleanserProtocol(Protocol):
    """Finds poison in a training set: ``find_poison(data, **inputs) -> DetectionResult`` (True = flagged).

    ``inputs``: the keyword inputs it uses, a subset of :data:`CLEANSER_INPUTS` (``model``: a model trained on the
    data; ``trusted``: a trusted clean set; ``train_fn(data) -> model``: trains with the baseline recipe;
    ``provenance``: ``manifest``/``key``/``sources`` of named contributors). ``trusted_data``: ``required`` (refused
    at validation when the profile has no trusted clean set), ``optional`` (used when present) or ``unused``.
    ``trusted_role``: one line on what the trusted set does for it (shown in the report). ``known_weak``: settings
    (keys from :func:`poison_setting`) where it is measured to fail, each with the measurement; the report warns
    when a run is in one."""

    inputs: ClassVar[frozenset[str]]
    trusted_data: ClassVar[TrustedNeed]
    trusted_role: ClassVar[str]
    known_weak: ClassVar[dict[str, str]]

    def find_poison(self, data: Dataset, **inputs: Any) -> DetectionResult: ...


@runtime_checkable
class RepairProtocol(Protocol):
    """Repairs a (possibly backdoored) model with trusted clean data: ``repair(model, *, clean, device, seed) ->
    model``. After it, ``report_`` holds JSON facts (``infected_classes``, ``anomaly_index``, ``anomaly_threshold``,
    ``pruned`` ... where they apply) and ``diagnostic_images()`` titled image grids for the report (may be empty)."""

    trusted_data: ClassVar[TrustedNeed]
    report_: dict[str, Any]

    def repair(self, model: nn.Module, *, clean: Dataset, device: str | torch.device = "cpu",
               seed: int = 0) -> nn.Module: ...

    def diagnostic_images(self) -> dict[str, tuple[torch.Tensor, list[str]]]: ...


@runtime_checkable
class InspectorProtocol(Protocol):
    """Diagnostics only: ``inspect(model, *, reference, data, device) -> dict`` compares the model with a clean
    ``reference`` model trained with the same recipe, on trusted ``data``; the dict holds ``suspicious`` (bool, the
    verdict) and ``flagged_classes`` (classes it names; may be empty)."""

    trusted_data: ClassVar[TrustedNeed]

    def inspect(self, model: nn.Module, *, reference: nn.Module, data: Dataset,
                device: str | torch.device = "cpu") -> dict[str, Any]: ...


#: a trusted set with fewer images per class than this is ``trusted:small``: the feature-space cleansers held with
#: the 500-image validation split of mnist5k (about 50 a class) and failed in some settings with 100 (about 10)
SMALL_TRUSTED_PER_CLASS = 50


def poison_setting(info: dict[str, Any], *, trusted: bool, trusted_per_class: float | None = None) -> set[str]:
    """The setting keys of a poisoning run that cleansers' ``known_weak`` refer to: ``trusted:none``,
    ``trusted:small`` (``trusted_per_class`` below ``SMALL_TRUSTED_PER_CLASS``), ``mapping:all_to_all``,
    ``trigger:blended`` (a full-image blended trigger), ``trigger:random_position``, ``trigger:single_pixel``."""
    keys = set() if trusted else {"trusted:none"}
    if trusted and trusted_per_class is not None and trusted_per_class < SMALL_TRUSTED_PER_CLASS:
        keys.add("trusted:small")
    if info.get("mapping") == "all_to_all":
        keys.add("mapping:all_to_all")
    trig = info.get("trigger")
    if isinstance(trig, dict):
        mask = trig.get("mask")
        if trig.get("blend_alpha", 1.0) < 1.0:
            keys.add("trigger:blended")
        if trig.get("position") == "random":
            keys.add("trigger:random_position")
        if mask is not None and tuple(mask.shape[-2:]) == (1, 1):
            keys.add("trigger:single_pixel")
    return keys


POISONING_PROTOCOLS: dict[str, type] = {
    "cleanser": CleanserProtocol,
    "repair": RepairProtocol,
    "inspector": InspectorProtocol,
    "trainer": TrainerProtocol,
}
