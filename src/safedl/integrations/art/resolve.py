"""Resolve ``art:ClassName`` to a registered safedl component class (the registry's hook for the ``art:`` prefix).

The adapter class is made once per (kind, ART class) and registered under ``art:ClassName``, so ``create``,
``params``, ``creation_params`` and bundles treat it like any built-in component. An unknown ART class lists the
ART classes that this kind supports.
"""
from __future__ import annotations

from typing import Any

from safedl.errors import UnknownComponentError
from safedl.integrations.art import evasion, postprocess, preprocess
from safedl.integrations.art.backdoor import ArtPoisoningAttackBackdoor
from safedl.integrations.art.clean_label import ArtPoisoningAttackCleanLabelBackdoor
from safedl.integrations.art.detector import ArtBinaryActivationDetector, ArtBinaryInputDetector
from safedl.integrations.art.loader import ART_MODULES, PREFIX, art_classes
from safedl.integrations.art.signature import adapter_class
from safedl.registry import register

#: the safedl kinds an ART class can be used as, in the order ``kind_of`` tries them
SUPPORTED_KINDS: tuple[str, ...] = ("evasion", "preprocessor", "postprocessor", "detector", "backdoor")
#: kinds whose ART classes take code (networks, functions) in their constructors: only the hand-written adapters
FIXED_ONLY: frozenset[str] = frozenset({"backdoor", "detector"})
#: ART classes the adapter wraps with a hand-written class (their ART constructor takes code, not data)
FIXED_ADAPTERS: dict[tuple[str, str], type] = {
    ("backdoor", "PoisoningAttackBackdoor"): ArtPoisoningAttackBackdoor,
    ("backdoor", "PoisoningAttackCleanLabelBackdoor"): ArtPoisoningAttackCleanLabelBackdoor,
    ("detector", "BinaryInputDetector"): ArtBinaryInputDetector,
    ("detector", "BinaryActivationDetector"): ArtBinaryActivationDetector,
}
#: ART defaults safedl changes (GaussianAugmentation transforms the input instead of appending noisy copies)
DEFAULTS: dict[str, dict[str, Any]] = {"GaussianAugmentation": {"augmentation": False}}


def _attrs(kind: str, art_cls: type) -> dict[str, Any]:
    name = art_cls.__name__
    if kind == "evasion":
        return {"access": evasion.access_of(art_cls)}
    if kind == "preprocessor":
        return {"randomized": name in preprocess.RANDOMIZED}
    return {"preserves_argmax": name not in postprocess.CHANGES_ARGMAX}


def _base(kind: str) -> tuple[type, list]:
    if kind == "evasion":
        return evasion.ArtEvasionAttack, evasion.OWN_PARAMS
    if kind == "preprocessor":
        return preprocess.ArtPreprocessor, preprocess.OWN_PARAMS
    return postprocess.ArtPostprocessor, postprocess.OWN_PARAMS


def supported(kind: str) -> dict[str, type]:
    """ART classes usable as ``kind`` (empty for kinds the adapter does not cover)."""
    if kind in FIXED_ONLY:
        return {n: c for n, c in art_classes(kind).items() if (kind, n) in FIXED_ADAPTERS}
    return art_classes(kind) if kind in SUPPORTED_KINDS else {}


def component_class(kind: str, name: str) -> type:
    """The safedl class for registry name ``name`` (``art:ClassName``) of ``kind``, made and registered on first use."""
    art_name = name[len(PREFIX):]
    classes = supported(kind)
    if art_name not in classes:
        elsewhere = [k for k in SUPPORTED_KINDS if k != kind and art_name in supported(k)]
        if elsewhere:
            raise UnknownComponentError(f"{name!r} is an ART {elsewhere[0]} component, not a {kind} one; list it "
                                        f"where {elsewhere[0]} components go")
        if kind not in SUPPORTED_KINDS:
            raise UnknownComponentError(f"unknown {kind} {name!r}: the ART adapter covers ART components of kinds "
                                        f"{', '.join(SUPPORTED_KINDS)}, not {kind}")
        raise UnknownComponentError(f"unknown {kind} {name!r}: not an ART class the adapter covers as {kind} "
                                    f"(ART module {ART_MODULES[kind][0]}); valid art: {kind} names are: "
                                    f"{', '.join(PREFIX + n for n in sorted(classes))}")
    art_cls = classes[art_name]
    if (kind, art_name) in FIXED_ADAPTERS:
        return register(kind, name)(FIXED_ADAPTERS[(kind, art_name)])
    base, own = _base(kind)
    cls = adapter_class(base, art_cls, kind=kind, own=own, defaults=DEFAULTS.get(art_name))
    for key, value in _attrs(kind, art_cls).items():
        setattr(cls, key, value)
    return register(kind, name)(cls)


def kind_of(name: str, kinds: tuple[str, ...]) -> str:
    """The first of ``kinds`` under which the ART class of ``name`` can be used."""
    art_name = name[len(PREFIX):]
    for kind in kinds:
        if art_name in supported(kind):
            return kind
    allowed = sorted({PREFIX + n for k in kinds for n in supported(k)})
    raise UnknownComponentError(f"unknown component {name!r}: no ART class of that name among the kinds "
                                f"{', '.join(k for k in kinds if k in SUPPORTED_KINDS) or '(none the ART adapter covers)'}"
                                f"; valid art: names are: {', '.join(allowed) or '(none)'}")
