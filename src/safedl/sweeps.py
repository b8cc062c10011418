"""Eps sweeps: an attack whose ``params.eps`` is a list runs once per value, as separate attacks with ids
``<id>@<eps>`` and a scalar ``params.eps``; a defense's ``against: [<id>]`` covers every value of the sweep.

The expansion works on the validated profile's spec objects (pydantic ``model_copy``), so every expanded attack is
then checked like any other (its registry name, its parameters, the threat model)."""
from __future__ import annotations

from numbers import Real
from typing import Any, Sequence

SEP = "@"


def sweep_id(key: str, eps: float) -> str:
    """The id of one value of a sweep: ``pgd@0.03``."""
    return f"{key}{SEP}{eps:g}"


def check_eps_list(value: Any) -> None:
    """A sweep's ``eps``: a non-empty list of distinct positive numbers (ValueError otherwise)."""
    if not isinstance(value, list):
        return
    if not value:
        raise ValueError("params.eps is an empty list; an eps sweep needs at least one value, e.g. "
                         "[0.01, 0.03, 0.05, 0.1, 0.2]")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, Real) or not v > 0]
    if bad:
        raise ValueError(f"params.eps sweep values must be positive numbers; got {bad!r}")
    if len({sweep_id('', float(v)) for v in value}) != len(value):
        raise ValueError(f"params.eps sweep values must be distinct; got {value!r}")


def expand_attacks(specs: Sequence[Any]) -> tuple[list[Any], dict[str, list[str]]]:
    """The attack specs with every sweep expanded in place, and each swept id -> the ids of its values."""
    out: list[Any] = []
    groups: dict[str, list[str]] = {}
    for spec in specs:
        eps = spec.params.get("eps")
        if not isinstance(eps, list):
            out.append(spec)
            continue
        ids = []
        for value in eps:
            new_id = sweep_id(spec.key, float(value))
            out.append(spec.model_copy(update={"id": new_id, "params": {**spec.params, "eps": value}}, deep=True))
            ids.append(new_id)
        groups[spec.key] = ids
    return out, groups


def expand_against(against: Sequence[str], groups: dict[str, list[str]]) -> list[str]:
    """``against`` with each swept id replaced by the ids of all its values."""
    return [i for a in against for i in groups.get(a, [a])]


def split_sweep_id(attack_id: str) -> tuple[str, str] | None:
    """(swept id, eps text) of a sweep member's id, None for an id with no ``@``."""
    base, sep, eps = attack_id.rpartition(SEP)
    return (base, eps) if sep and base else None


def source_indices(specs: Sequence[Any]) -> list[int]:
    """For each expanded spec, the index of the entry it came from in the profile as written (the values of one
    sweep are consecutive and share the swept id), so an error names the key the user wrote."""
    out, index, previous = [], -1, None
    for spec in specs:
        parts = split_sweep_id(spec.key)
        base = parts[0] if parts else None
        if base is None or base != previous:
            index += 1
        previous = base
        out.append(index)
    return out
