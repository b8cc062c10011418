"""Lazy import of ART: safedl imports and runs without it; naming an ``art:`` component without it is one clear error."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from safedl.errors import ConfigError

PREFIX = "art:"
#: where the ART classes of each safedl kind live, and the ART base class they must derive from
ART_MODULES: dict[str, tuple[str, str]] = {
    "evasion": ("art.attacks.evasion", "art.attacks.attack.EvasionAttack"),
    "poisoning": ("art.attacks.poisoning", "art.attacks.attack.PoisoningAttackBlackBox"),
    "backdoor": ("art.attacks.poisoning", "art.attacks.attack.PoisoningAttackBlackBox"),
    "preprocessor": ("art.defences.preprocessor", "art.defences.preprocessor.preprocessor.Preprocessor"),
    "postprocessor": ("art.defences.postprocessor", "art.defences.postprocessor.postprocessor.Postprocessor"),
    "detector": ("art.defences.detector.evasion", "art.defences.detector.evasion.evasion_detector.EvasionDetector"),
}


def import_art(what: str = "art") -> ModuleType:
    """Import an ART module; without the ``art`` extra, a ConfigError that says how to install it."""
    try:
        module = importlib.import_module(what)
    except ImportError as exc:
        raise ConfigError(f"components named 'art:...' need the Adversarial Robustness Toolbox, which is not "
                          f"installed ({exc}); install it with `pip install 'safedl[art]'` or remove the art: "
                          "entries from the profile") from None
    logging.getLogger("art").setLevel(logging.WARNING)
    return module


def art_base(kind: str) -> type:
    """The ART base class that an ART component of ``kind`` derives from."""
    module, _, name = ART_MODULES[kind][1].rpartition(".")
    return getattr(import_art(module), name)


def art_classes(kind: str) -> dict[str, type]:
    """The concrete ART classes usable as ``kind`` (name -> class), from ART's public module for that kind."""
    module = import_art(ART_MODULES[kind][0])
    base = art_base(kind)
    out = {}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base and not getattr(obj, "__abstractmethods__", None):
            out[name] = obj
    return out
