"""Safe-DL's defense step on a finished run: per attack, the defenses the evidence recommends
(``safedl.decide.recommend``: measured ones that help, then the knowledge base's priors), each with its full parameter
set (the constructor's defaults, overridden by what was measured or what the prior used), accepted or customised,
then written into a new profile that is validated before anything is written (and written by temp file + rename).

``choices(results)`` lists the options; ``apply(results, picks)`` turns the chosen (attack, defense, params) into the
profile. The CLI asks (``safedl defend RUN_DIR``) or takes flags (``--accept-all``, ``--pick``, ``--set``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from safedl.decide.recommend import recommend
from safedl.errors import UserError
from safedl.param_aliases import resolve_aliases


@dataclass
class Option:
    """One recommended defense for one attack: registry name, full parameters, and why."""

    name: str
    params: dict[str, Any]
    evidence: str
    why: str


@dataclass
class AttackChoice:
    attack: str
    category: str
    summary: str
    options: list[Option] = field(default_factory=list)


def _full_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The constructor's parameters with their defaults, overridden by ``given`` (required ones keep theirs)."""
    from safedl import registry
    from safedl.registry import DEFENSE_KINDS

    kind = registry.find_kind(name, DEFENSE_KINDS)
    out = {p.name: _plain(p.default) for p in registry.params(kind, name) if not p.required}
    out.update(given)
    return out


def _plain(value: Any) -> Any:
    """A default as YAML can write it (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def customise(opt: Option, updates: dict[str, Any]) -> Option:
    """``opt`` with ``updates`` applied (names users know allowed); an unknown parameter names the valid ones."""
    from safedl.param_aliases import ALIASES

    known = set(opt.params) | set(ALIASES.get(opt.name, {}))
    bad = sorted(set(updates) - known)
    if bad:
        raise UserError(f"{opt.name} has no parameter {', '.join(bad)}; its parameters are: {', '.join(sorted(known))}")
    try:
        given = resolve_aliases(opt.name, dict(updates))  # an alias given now overrides the value it renames
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Option(opt.name, {**opt.params, **given}, opt.evidence, opt.why)


def choices(results: dict[str, Any], *, priors: Optional[list[dict[str, Any]]] = None) -> list[AttackChoice]:
    """Per succeeded attack: the candidates that help (measured or prior), in recommend's order."""
    rec = recommend(results, priors=priors)
    measured = {d["id"]: d for d in results.get("defenses", [])}
    out = []
    for row in rec["attacks"]:
        if not row["succeeded"]:
            continue
        c = AttackChoice(row["attack"], row["category"], f"{row['quantity']} = {row['before']:.3f}")
        for cand in row["candidates"]:
            if not cand["helps"]:
                continue
            if cand["evidence"] == "measured":
                d = measured[cand["defense"]]
                if not d.get("name"):
                    continue  # a layered pipeline: keep it in the profile by hand
                name, given = d["name"], dict(d.get("params") or {})
            else:
                name, given = cand["defense"], dict(cand.get("params") or {})
            c.options.append(Option(name, _full_params(name, given), cand["evidence"], cand["why"]))
        out.append(c)
    return out


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``DEFENSE.PARAM=VALUE`` (VALUE read as YAML: 3, 0.5, true, [a, b]) -> {defense: {param: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot or not name or not param:
            raise UserError(f"--set {item!r}: expected DEFENSE.PARAM=VALUE (e.g. activation_clustering.num_clusters=3)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: VALUE is not valid YAML ({exc})") from None
        out.setdefault(name, {})[param] = value
    return out


def apply(results: dict[str, Any], picks: list[tuple[str, Option]]) -> dict[str, Any]:
    """The run's profile with its defenses replaced by the picks: one entry per (defense, parameters), against
    every attack it was picked for."""
    prof = copy.deepcopy(results["profile"])
    entries: dict[str, dict[str, Any]] = {}
    names: dict[str, int] = {}
    for attack, opt in picks:
        params = resolve_aliases(opt.name, dict(opt.params))
        key = yaml.safe_dump([opt.name, params], sort_keys=True)
        if key in entries:
            entries[key]["against"].append(attack)
            continue
        names[opt.name] = names.get(opt.name, 0) + 1
        spec = {"name": opt.name, "params": params, "against": [attack]}
        if names[opt.name] > 1:
            spec["id"] = f"{opt.name}_{attack}"
        entries[key] = spec
    prof["defenses"] = list(entries.values())
    return prof


def write_profile(prof: dict[str, Any], out: Path, *, run_dir: Path) -> Path:
    """Validate ``prof`` and write it to ``out`` atomically (a ProfileError leaves nothing written)."""
    from safedl.profile import parse_profile
    from safedl.utils.io import atomic_write_text

    try:
        parse_profile(prof, source=str(out))
    except UserError as exc:
        raise UserError(f"the chosen defenses do not make a valid profile, nothing written: {exc}") from None
    header = (f"# {prof.get('name')} with the defenses chosen by `safedl defend {run_dir}`.\n"
              f"# Measure them, reusing every finished stage:  safedl run {out} --resume {run_dir}\n")
    atomic_write_text(Path(out), header + yaml.safe_dump(prof, sort_keys=False))
    return Path(out)
