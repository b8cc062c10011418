"""What each ``threat_model`` answer changes: which attacks a profile may list, and with which surrogate.

One small function, :func:`threat_errors`, called by profile validation before anything runs. The rules (also in
docs/threat-model.md; the risk weights of the same answers are in docs/risk.md):

- ``model_access``: ``white-box``: every attack. ``gray-box`` (the attacker knows the architecture and the training
  data, not the weights): no gradient attack on the target; use ``transfer`` with ``source: train`` (a surrogate of
  the attacker's choosing trained on the training data; the questionnaire gives it the target's architecture).
  ``black-box``: no gradient attack, and a transfer surrogate must learn from the target's answers
  (``source: queries``) when the interface returns anything (the attacker has no labelled training data).
- ``interface_exposed``: ``scores``: every query attack; ``labels``: decision-based attacks only; ``none``: no query
  attack, and no transfer surrogate trained from queries.
- ``attack_goal``: which attack categories serve the goal (``GOAL_CATEGORIES``; model extraction only under
  ``any``); ``targeted`` also requires every evasion attack to be ``targeted: true``.
- ``deployment_scenario``: ``edge_device`` ships the weights to the attacker's hardware, so ``model_access`` must be
  ``white-box``; ``cloud_api`` exposes the model through an API, so ``interface_exposed`` cannot be ``none``;
  ``internal`` and ``research`` add no constraint (their effect is on the budgets the questionnaire writes:
  ``QUERY_BUDGET``).
- ``data_sensitivity`` and ``training_data_source`` weight the risk rating (docs/risk.md); ``training_data_source:
  trusted`` makes the questionnaire leave poisoning out.
"""
from __future__ import annotations

from typing import Any

GOAL_CATEGORIES: dict[str, tuple[str, ...]] = {
    "untargeted": ("evasion", "poisoning"),
    "targeted": ("evasion", "poisoning", "backdoor"),
    "availability": ("poisoning",),
    "backdoor": ("backdoor",),
    "any": ("evasion", "poisoning", "backdoor", "extraction"),
}
# Queries per image an attacker is assumed to afford, by where the model runs (written by the questionnaire).
QUERY_BUDGET = {"cloud_api": 5000, "edge_device": 10000, "internal": 1000, "research": 5000}


def _access(attack: Any) -> tuple[str, str | None]:
    """(access kind, transfer source or None) of a built evasion attack."""
    access = getattr(attack, "access", "white-box")
    return access, getattr(attack, "source", None) if access == "transfer" else None


def _evasion_errors(tm: Any, where: str, spec: Any, attack: Any) -> list[tuple[str, str]]:
    access, source = _access(attack)
    out = []
    if access == "white-box" and tm.model_access != "white-box":
        hint = ("use `transfer` with source: train (the gray-box attacker's surrogate: same architecture, trained on "
                "the training data)" if tm.model_access == "gray-box"
                else "use a query attack or `transfer` with source: queries")
        out.append((f"{where}.name", f"{spec.name!r} needs white-box (gradient) access but threat_model.model_access "
                    f"is {tm.model_access!r}; {hint}"))
    if access == "scores" and tm.interface_exposed != "scores":
        out.append((f"{where}.name", f"{spec.name!r} needs scores but threat_model.interface_exposed is "
                    f"{tm.interface_exposed!r}; use a decision-based (labels-only) attack"))
    if access == "labels" and tm.interface_exposed == "none":
        out.append((f"{where}.name", "threat_model.interface_exposed is 'none': no query attack is possible"))
    if source == "queries" and tm.interface_exposed == "none":
        out.append((f"{where}.params", "transfer with source: queries needs an interface; threat_model."
                    "interface_exposed is 'none' (use source: train)"))
    if source == "train" and tm.model_access == "black-box" and tm.interface_exposed != "none":
        out.append((f"{where}.params", "a black-box attacker has no labelled training data: use transfer with "
                    "source: queries (or threat_model.model_access: gray-box)"))
    if tm.attack_goal == "targeted" and not spec.targeted:
        out.append((f"{where}.targeted", f"threat_model.attack_goal is 'targeted': set targeted: true on {spec.key!r}"))
    return out


def threat_errors(profile: Any, attacks: dict[tuple[str, int], Any]) -> list[tuple[str, str]]:
    """Every conflict between the profile's attacks and its threat model, as (location, message) pairs.

    ``attacks`` maps (category, index) to the attack built from the profile (the ones that could be built).
    """
    tm = profile.threat_model
    errors: list[tuple[str, str]] = []
    if tm.deployment_scenario == "edge_device" and tm.model_access != "white-box":
        errors.append(("threat_model.model_access", "deployment_scenario 'edge_device' puts the weights on the "
                       f"attacker's hardware, so model_access must be 'white-box' (got {tm.model_access!r})"))
    if tm.deployment_scenario == "cloud_api" and tm.interface_exposed == "none":
        errors.append(("threat_model.interface_exposed", "deployment_scenario 'cloud_api' answers queries, so "
                       "interface_exposed must be 'scores' or 'labels' (got 'none')"))
    allowed = GOAL_CATEGORIES[tm.attack_goal]
    for cat in ("evasion", "poisoning", "backdoor", "extraction"):
        for i, spec in enumerate(getattr(profile.attacks, cat, [])):
            where = f"attacks.{cat}[{i}]"
            if cat not in allowed:
                errors.append((where, f"threat_model.attack_goal {tm.attack_goal!r} is served by "
                               f"{' / '.join(allowed)} attacks, not by the {cat} attack {spec.key!r}; remove it or "
                               "set attack_goal: any"))
                continue
            if cat == "evasion" and (cat, i) in attacks:
                errors += _evasion_errors(tm, where, spec, attacks[(cat, i)])
    return errors
