"""Threat-modelling questionnaire: the questions a security reviewer asks, turned into a commented profile.

``safedl init --interactive`` asks them with rich prompts; the same answers can be given as flags
(``safedl init --access black-box --outputs labels ...``). :func:`profile_text` writes a profile whose attacks,
budgets and defenses follow from the answers, each choice explained in a comment. What each answer changes at
validation time is in :mod:`safedl.threat`; how it weights the risk rating in docs/risk.md.
"""
from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from safedl.threat import GOAL_CATEGORIES, QUERY_BUDGET

# the question, then each allowed answer with what it means (shown by the prompt and in --help)
QUESTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "access": ("Who can get at the model itself?", {
        "white-box": "the weights can leak or are shipped (gradient attacks)",
        "gray-box": "the architecture and training data are known, the weights are not (transfer from a look-alike)",
        "black-box": "nothing but the answers it gives (query and transfer attacks)"}),
    "outputs": ("What does a query return?", {
        "scores": "class probabilities or logits", "labels": "only the predicted class",
        "none": "users cannot query it at all"}),
    "data_source": ("Who supplies or labels the training data?", {
        "trusted": "only your own team", "curated": "outside data, reviewed before use",
        "third_party": "a vendor, not reviewed per sample", "crowdsourced": "anyone can contribute or label",
        "scraped": "collected from the web"}),
    "goal": ("What would an attacker want?", {
        "untargeted": "any wrong answer", "targeted": "a class of their choosing",
        "availability": "to degrade the model for everyone (denial of service)",
        "backdoor": "a hidden trigger only they know", "copy": "a copy of the model (extraction)",
        "any": "all of the above"}),
    "sensitivity": ("How costly is a wrong answer?", {
        "low": "an inconvenience", "medium": "money or time, noticed later", "high": "harm, safety or security"}),
    "deployment": ("Where does the model run?", {
        "cloud_api": "behind an API", "edge_device": "on devices the attacker can hold",
        "internal": "inside the organisation only", "research": "not deployed"}),
}
DEFAULTS = {"access": "white-box", "outputs": "scores", "data_source": "curated", "goal": "any",
            "sensitivity": "medium", "deployment": "cloud_api"}


class Answers(BaseModel):
    """The questionnaire's answers (same names as the ``safedl init`` flags)."""

    model_config = ConfigDict(extra="forbid")
    access: Literal["white-box", "gray-box", "black-box"] = "white-box"
    outputs: Literal["scores", "labels", "none"] = "scores"
    data_source: Literal["trusted", "curated", "third_party", "crowdsourced", "scraped"] = "curated"
    goal: Literal["untargeted", "targeted", "availability", "backdoor", "copy", "any"] = "any"
    sensitivity: Literal["low", "medium", "high"] = "medium"
    deployment: Literal["cloud_api", "edge_device", "internal", "research"] = "cloud_api"
    dataset: str = "mnist5k"
    model: str = "small_cnn"
    eps: float = 0.3


def ask(console: Any = None) -> Answers:
    """Ask every question with a rich prompt (choices listed, the default in brackets)."""
    from rich.console import Console
    from rich.prompt import Prompt

    console = console or Console()
    got = {}
    for key, (question, choices) in QUESTIONS.items():
        console.print(f"[bold]{question}[/bold]")
        for value, meaning in choices.items():
            console.print(f"  [cyan]{value}[/cyan]: {meaning}")
        got[key] = Prompt.ask(key, choices=list(choices), default=DEFAULTS[key], console=console)
    return Answers(**got)


def _item(name: str, params: dict[str, Any], why: str, **extra: Any) -> tuple[dict[str, Any], str]:
    return {"name": name, **extra, "params": params}, why


def _evasion(a: Answers, goal: str) -> list[tuple[dict[str, Any], str]]:
    if "evasion" not in GOAL_CATEGORIES[goal]:
        return []
    tgt = {"targeted": True} if goal == "targeted" else {}
    steps = 40 if a.sensitivity == "high" else 10
    budget = QUERY_BUDGET[a.deployment]
    out = []
    if a.access == "white-box":
        out.append(_item("fgsm", {"eps": a.eps, "norm": "linf"}, "white-box: one-step gradient attack", **tgt))
        out.append(_item("pgd", {"eps": a.eps, "norm": "linf", "steps": steps},
                         f"white-box: iterative gradient attack, {steps} steps ({a.sensitivity} sensitivity)", **tgt))
        if a.sensitivity == "high":
            out.append(_item("ensemble", {"eps": a.eps, "norm": "linf"}, "high sensitivity: AutoAttack-style worst "
                             "case", **tgt))
    elif a.access == "gray-box":
        out.append(_item("transfer", {"surrogate": a.model, "source": "train", "attack": "pgd", "eps": a.eps},
                         "gray-box: the attacker trains the same architecture on the training data and transfers PGD",
                         **tgt))
    else:
        source = "queries" if a.outputs != "none" else "train"
        out.append(_item("transfer", {"surrogate": "small_cnn", "source": source, "eps": a.eps,
                                      **({"max_queries": budget} if source == "queries" else {})},
                         "black-box: a surrogate of the attacker's choosing, trained on "
                         + ("the target's answers" if source == "queries" else "similar public data"), **tgt))
    if a.outputs == "scores":
        out.append(_item("square", {"eps": a.eps, "norm": "linf", "max_queries": budget},
                         f"scores are returned: score-based query attack, {budget} queries ({a.deployment})", **tgt))
    elif a.outputs == "labels":
        out.append(_item("hopskipjump", {"norm": "linf", "eps": a.eps, "max_queries": budget},
                         f"labels only: decision-based query attack, {budget} queries ({a.deployment})", **tgt))
    return out


def _poisoning(a: Answers, goal: str) -> tuple[list, list]:
    if a.data_source == "trusted":
        return [], []
    poison, backdoor = [], []
    if "poisoning" in GOAL_CATEGORIES[goal]:
        if goal == "availability" or goal == "untargeted":
            poison.append(_item("label_flipping", {"strategy": "fully_random", "flip_rate": 0.2, "target_class": None},
                                f"{a.data_source} data: random label flips degrade accuracy"))
        else:
            poison.append(_item("label_flipping", {"strategy": "many_to_one", "flip_rate": 0.2},
                                f"{a.data_source} data: labels flipped towards one class"))
    if "backdoor" in GOAL_CATEGORIES[goal]:
        backdoor.append(_item("static_patch", {"trigger": "pattern", "poison_fraction": 0.1, "target_class": 7},
                              f"{a.data_source} data: BadNets patch trigger in 10% of the training set"))
    return poison, backdoor


def _extraction(a: Answers, goal: str) -> list[tuple[dict[str, Any], str]]:
    if "extraction" not in GOAL_CATEGORIES[goal] or a.outputs == "none":
        return []
    budget = QUERY_BUDGET[a.deployment]
    budgets = [b for b in (250, 500, 1000, 2000, 4000) if b <= budget]
    return [_item("copycat", {"budgets": budgets}, f"a copy of the model through the {a.outputs} interface, up to "
                  f"{budgets[-1]} queries ({a.deployment})")]


def _defenses(ev: list, po: list, bd: list, a: Answers) -> list[tuple[dict[str, Any], str]]:
    out = []
    grad = [e for e, _ in ev if e["name"] in ("pgd", "transfer")]
    if grad:
        out.append(({"name": "adversarial_training", "params": {"eps": a.eps}, "against": [grad[0]["name"]]},
                    "PGD adversarial training: the measured robust defense against gradient attacks"))
    if bd:
        out.append(({"name": "spectral_signatures", "against": ["static_patch"]}, "find the poison, retrain"))
    if po:
        out.append(({"name": "data_cleaning", "against": ["label_flipping"]}, "drop suspected flipped labels"))
    return out


def _dump(obj: Any) -> str:
    return yaml.safe_dump(obj, default_flow_style=True, sort_keys=False, width=1000).strip().replace("\n", " ")


def _section(items: list[tuple[dict, str]], indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for spec, why in items:
        lines.append(f"{pad}- {_dump(spec)}")
        lines.append(f"{pad}  # ^ {why}")
    return lines


def profile_text(a: Answers, *, name: str = "threat") -> str:
    """A commented profile whose threat model, attacks, budgets and defenses follow from the answers."""
    goal = "any" if a.goal == "copy" else a.goal
    ev = _evasion(a, goal)
    po, bd = _poisoning(a, goal)
    lines = ["# safedl threat profile written by `safedl init` from the questionnaire's answers.",
             "# Each choice is explained next to it; docs/threat-model.md lists what every answer changes.",
             f"name: {name}", "seed: 0", "", "threat_model:"]
    for field, key in (("model_access", "access"), ("interface_exposed", "outputs"),
                       ("training_data_source", "data_source"), ("attack_goal", None),
                       ("data_sensitivity", "sensitivity"), ("deployment_scenario", "deployment")):
        value = goal if key is None else getattr(a, key)
        meaning = QUESTIONS["goal" if key is None else key][1][a.goal if key is None else value]
        lines.append(f"  {field}: {value}  # {meaning}")
    if a.goal == "copy":
        lines.append("  # a copy of the model: attack_goal 'any' is the goal that plans model extraction")
    lines += ["", "dataset:", f"  name: {a.dataset}", "model:", f"  arch: {a.model}", "", "attacks:"]
    for cat, items in (("evasion", ev), ("poisoning", po), ("backdoor", bd), ("extraction", _extraction(a, goal))):
        lines.append(f"  {cat}:" + ("" if items else " []  # not planned under these answers"))
        lines += _section(items, 4)
    defs = _defenses(ev, po, bd, a)
    lines.append("defenses:" + ("" if defs else " []"))
    lines += _section(defs, 2)
    max_risk = {"high": "medium", "medium": "high", "low": "high"}[a.sensitivity]
    lines += ["", "evaluation:", "  gate:", f"    max_risk: {max_risk}  # residual risk allowed at {a.sensitivity} "
              "sensitivity (docs/risk.md)", ""]
    return "\n".join(lines)


def write_profile(path: Any, *, flags: dict[str, str], interactive: bool, force: bool) -> None:
    """`safedl init`: the default profile without answers, else the questionnaire's profile, validated before writing."""
    from pathlib import Path

    from pydantic import ValidationError

    from safedl.errors import ProfileError, UserError
    from safedl.profile import parse_profile
    from safedl.templates import default_profile_text
    from safedl.utils.io import atomic_write_text

    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if not interactive and not flags:
        atomic_write_text(path, default_profile_text())
        return
    try:
        answers = Answers(**flags) if not interactive else Answers(**{**ask().model_dump(), **flags})
    except ValidationError as exc:
        bad = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})"
                        for e in exc.errors())
        raise UserError(f"safedl init: {bad}") from None
    text = profile_text(answers, name=path.stem.replace(" ", "_") or "threat")
    try:
        parse_profile(yaml.safe_load(text), source=str(path))
    except ProfileError as exc:  # answers that contradict each other (edge_device + black-box): nothing is written
        raise UserError(f"these answers do not make a valid profile, nothing written: {exc}") from None
    atomic_write_text(path, text)
