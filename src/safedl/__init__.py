"""safedl: assess and harden PyTorch image classifiers against evasion, poisoning and backdoor attacks.

The public Python API (imported on first use, so ``import safedl`` stays cheap):

    run_assessment(profile, ...)   run or resume a whole assessment (what ``safedl run`` does); see safedl.run
    load_profile(path)             read and validate a threat profile
    registry                       every component by kind and name: names, create, KINDS
    SecurePipeline                 the defended system as one object (preprocess -> detect -> model -> postprocess)
    load_bundle(path)              a verified deployment bundle (what ``safedl export`` writes)
    ServiceClient                  a client of ``safedl serve``
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "run_assessment": "safedl.run.pipeline",
    "load_profile": "safedl.profile",
    "SecurePipeline": "safedl.deploy.pipeline",
    "load_bundle": "safedl.deploy.bundle",
    "ServiceClient": "safedl.serve.client",
}
__all__ = ["SecurePipeline", "ServiceClient", "__version__", "load_bundle", "load_profile", "registry",
           "run_assessment"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from safedl import registry
    from safedl.deploy.bundle import load_bundle
    from safedl.deploy.pipeline import SecurePipeline
    from safedl.profile import load_profile
    from safedl.run.pipeline import run_assessment
    from safedl.serve.client import ServiceClient


def __getattr__(name: str) -> Any:
    if name == "registry":
        return importlib.import_module("safedl.registry")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safedl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
