"""Parameter names users know from other tools (Safe-DL, ART), accepted in a profile and rewritten to the one name
each constructor has (constructors keep one name, so ``registry.creation_params`` round-trips).

- ``activation_clustering``: ``num_clusters`` -> ``n_clusters``;
- ``per_class_monitoring``: ``std_threshold`` -> ``z`` (how many standard deviations of McNemar's statistic);
- ``pruning``: ``all_layers: true`` -> ``scope: all_layers``, ``last_layer_only: true`` -> ``scope: last_conv``
  (``false`` leaves the scope as given or defaulted).
Giving an alias together with its canonical name, with different values, is an error naming both.
"""
from __future__ import annotations

from typing import Any, Callable

Rewrite = Callable[[Any], tuple[str, Any]]


def _rename(canonical: str) -> Rewrite:
    return lambda value: (canonical, value)


def _scope(value_if_true: str, alias: str) -> Rewrite:
    def rewrite(value: Any) -> tuple[str, Any]:
        if not isinstance(value, bool):
            raise ValueError(f"{alias} must be true or false, got {value!r}")
        return ("scope", value_if_true) if value else ("", None)
    return rewrite


ALIASES: dict[str, dict[str, Rewrite]] = {
    "activation_clustering": {"num_clusters": _rename("n_clusters")},
    "per_class_monitoring": {"std_threshold": _rename("z")},
    "pruning": {"all_layers": _scope("all_layers", "all_layers"),
                "last_layer_only": _scope("last_conv", "last_layer_only")},
}


def resolve_aliases(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every alias of component ``name`` rewritten to its canonical parameter (ValueError on a
    conflict between an alias and the canonical name, or between two aliases)."""
    table = ALIASES.get(name)
    if not table or not any(k in table for k in params):
        return params
    out = {k: v for k, v in params.items() if k not in table}
    given: dict[str, str] = {}
    for alias in [k for k in params if k in table]:
        key, value = table[alias](params[alias])
        if not key:
            continue
        if key in out and out[key] != value:
            first = f"{given[key]}" if key in given else f"{key}: {out[key]!r}"
            raise ValueError(f"{name}: {alias}: {params[alias]!r} means {key}: {value!r}, which conflicts with {first}; "
                             "give one of them")
        out[key] = value
        given[key] = f"{alias}: {params[alias]!r}"
    return out
