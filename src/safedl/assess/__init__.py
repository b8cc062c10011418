"""Deprecated: ``safedl.assess`` was split into ``safedl.run`` (orchestration), ``safedl.evaluate`` (what one stage
computes) and ``safedl.decide`` (risk, gate, SLOs, recommendations, comparisons). This shim keeps the old import
paths working, with a DeprecationWarning, for one release; it will be removed in 0.3.

    safedl.assess.pipeline  -> safedl.run (pipeline, prepare, planning, state, adopt, results)
    safedl.assess.stages    -> safedl.run.stages          safedl.assess.handlers -> safedl.evaluate.base, safedl.run.handlers
    safedl.assess._preload  -> safedl.run._preload        safedl.assess.<attack_*|defend_*|context|defense_models>
    safedl.assess.<risk|gate|slo|recommend|compare> -> safedl.decide.<same>   -> safedl.evaluate.<same>
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

_EVALUATE = ("attack_evasion", "attack_extraction", "attack_poisoning", "context", "defend_evasion",
             "defend_extraction", "defend_poisoning", "defend_query", "defense_models")
_MOVED: dict[str, tuple[str, ...]] = {
    "pipeline": ("safedl.run.pipeline", "safedl.run.prepare", "safedl.run.planning", "safedl.run.state",
                 "safedl.run.adopt", "safedl.run.results"),
    "stages": ("safedl.run.stages",),
    "handlers": ("safedl.evaluate.base", "safedl.run.handlers"),
    "_preload": ("safedl.run._preload",),
    **{m: (f"safedl.decide.{m}",) for m in ("risk", "gate", "slo", "recommend", "compare")},
    **{m: (f"safedl.evaluate.{m}",) for m in _EVALUATE},
}


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, targets: tuple[str, ...]):
        self.old, self.targets = old, targets

    def create_module(self, spec):  # noqa: ANN001 - importlib's protocol
        warnings.warn(f"{self.old} is deprecated; import from {' / '.join(self.targets)}", DeprecationWarning,
                      stacklevel=3)
        mods = [importlib.import_module(t) for t in self.targets]
        if len(mods) == 1:
            return mods[0]
        merged = types.ModuleType(self.old, mods[0].__doc__)
        for m in reversed(mods):
            merged.__dict__.update({k: v for k, v in vars(m).items() if not k.startswith("__")})
        return merged

    def exec_module(self, module) -> None:  # noqa: ANN001
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        prefix, _, leaf = fullname.rpartition(".")
        if prefix != __name__ or leaf not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, _MOVED[leaf]))


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
