"""``clean_label``: the earlier name of two clean-label attacks, kept as an alias for one release.

``method="clean_label_backdoor"`` (default) builds :class:`LabelConsistentBackdoor` (registered as
``label_consistent_backdoor``), ``method="feature_collision"`` builds :class:`FeatureCollision` (registered as
``feature_collision``); the other parameters go to that class. Each use warns once (a FutureWarning, shown to
command-line users too) naming the new name; the alias goes in 0.3, with the ``assess`` re-exports.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

from safedl.attacks.poisoning.feature_collision import FeatureCollision
from safedl.attacks.poisoning.label_consistent import LabelConsistentBackdoor
from safedl.errors import ConfigError
from safedl.registry import register

METHODS = {"clean_label_backdoor": LabelConsistentBackdoor, "feature_collision": FeatureCollision}


@register("poisoning", "clean_label")
def clean_label(*, method: str = "clean_label_backdoor", **params: Any) -> Any:
    """Clean-label poisoning by the label-consistent backdoor (Turner et al. 2019) or feature collision (Shafahi et
    al. 2018), chosen by ``method``; an alias of ``label_consistent_backdoor`` and ``feature_collision``."""
    if method not in METHODS:
        raise ConfigError(f"clean_label: method={method!r} is not one of {', '.join(METHODS)}")
    cls = METHODS[method]
    warnings.warn(f"poisoning 'clean_label' (method: {method}) is deprecated and goes in 0.3: name "
                  f"'{cls.registry_name}' with the same parameters, without method", FutureWarning, stacklevel=2)
    accepted = set(inspect.signature(cls).parameters)
    foreign = sorted(set(params) - accepted)
    if foreign:
        raise ConfigError(f"clean_label: {', '.join(foreign)} do not apply to method={method!r} "
                          f"(its parameters: {', '.join(sorted(accepted))})")
    return cls(**params)


def _alias_signature() -> inspect.Signature:
    """``method`` plus every keyword parameter of both classes, so ``registry.params`` lists what the alias takes."""
    seen: dict[str, inspect.Parameter] = {"method": inspect.signature(clean_label).parameters["method"]}
    for cls in METHODS.values():
        for p in inspect.signature(cls).parameters.values():
            seen.setdefault(p.name, p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return inspect.Signature(list(seen.values()), return_annotation=Any)


clean_label.__signature__ = _alias_signature()  # type: ignore[attr-defined]
clean_label.alias_of = tuple(c.registry_name for c in METHODS.values())  # type: ignore[attr-defined]
