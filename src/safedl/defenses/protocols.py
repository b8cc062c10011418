"""One protocol per defense kind, written down once. Handlers rely on these, never on component names or
``hasattr`` probes. Every registered component also carries ``registry_kind`` and ``registry_name``.

Poisoning side: cleanser, repair, inspector, trainer (this file also holds the evasion-side kinds on main).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse.result import DetectionResult

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


@runtime_checkable
class TrainerProtocol(Protocol):
    """Robust training: ``fit(model, data, *, recipe, seed, device, val) -> model`` returns the model to use
    (which may be a new object, e.g. DP training's); ``report()`` returns facts for results.json (JSON values;
    numbers under ``metrics`` become metrics, ``notes`` are shown)."""

    def fit(self, model: nn.Module, data: Any, *, recipe: Any, seed: int, device: Any = "cpu",
            val: Any = None) -> nn.Module: ...

    def report(self) -> dict[str, Any]: ...


def poison_setting(info: dict[str, Any], *, trusted: bool) -> set[str]:
    """The setting keys of a poisoning run that cleansers' ``known_weak`` refer to: ``trusted:none``,
    ``mapping:all_to_all``, ``trigger:blended`` (a full-image blended trigger), ``trigger:random_position``,
    ``trigger:single_pixel``."""
    keys = set() if trusted else {"trusted:none"}
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
