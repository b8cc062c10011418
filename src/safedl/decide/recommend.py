"""Defense recommendations from a run's results.json and a knowledge base of measured priors.

Ranking rule (reproducible from results.json and ``priors.yaml`` alone):

1. An attack *succeeded* when the point value of its risk quantity (``safedl.decide.risk.quantity``: evasion
   1 - robust_accuracy, backdoor/poisoning the success rate, else the clean-accuracy drop) is at least
   ``SUCCESS_MIN``. Only those get recommendations.
2. Candidates are the defenses evaluated against that attack in this run (evidence: *measured*), then the knowledge
   base's entries for the attack's registry name that this run did not evaluate (evidence: *prior*, with the bench
   command and data it comes from).
3. A measured defense *helps* when the 95% intervals of the attack's quantity with and without it are separate
   (the upper bound with the defense is below the lower bound without it) and the defended model is not at chance
   (``safedl.decide.chance``: upper 95% bound of its clean accuracy below 1.5/K). Measured candidates that help come first, ordered by that upper bound, then by clean cost
   (clean accuracy lost), then by added latency; then the priors in the same order (the prior's bound, or its value
   when the bench gave no interval); measured candidates that do not help come last and are never recommended.
4. The recommendation is the first candidate. When it is a prior, the written profile adds that defense against the
   attack, so ``safedl run RUN_DIR/recommended.yaml --resume RUN_DIR`` measures it and reuses every finished stage.
"""
from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from safedl.decide.chance import at_chance, chance_flags, chance_limit, clean_metric
from safedl.decide.risk import QUANTITIES, defended_success, quantity
from safedl.errors import UserError
from safedl.utils.io import atomic_write_json, atomic_write_text
from safedl.rundir import RunDir

log = logging.getLogger(__name__)
SUCCESS_MIN = 0.05


def load_priors() -> list[dict[str, Any]]:
    """The shipped knowledge base (``safedl/decide/priors.yaml``)."""
    text = resources.files("safedl.decide").joinpath("priors.yaml").read_text(encoding="utf-8")
    return list(yaml.safe_load(text))


def _v(m: Any) -> Optional[float]:
    return float(m["value"]) if isinstance(m, dict) and m.get("value") is not None else None


def _clean_cost(defense: dict[str, Any], attack: dict[str, Any], baseline: Optional[float]) -> Optional[float]:
    m = defense.get("metrics", {})
    if _v(m.get("clean_accuracy_undefended")) is not None and _v(m.get("clean_accuracy")) is not None:
        return _v(m["clean_accuracy_undefended"]) - _v(m["clean_accuracy"])
    base = _v(attack.get("metrics", {}).get("baseline", {}).get("clean_accuracy")) or baseline
    if base is not None and _v(m.get("clean_accuracy_after")) is not None:
        return base - _v(m["clean_accuracy_after"])
    return None


def _interval_words(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """What the two 95% intervals show: separate and lower (helps), separate and higher (worse), or overlapping."""
    if after[1] < before[2]:
        return (f"95% intervals separate, lower with it: upper bound with it {after[1]:.3f} < lower bound without it "
                f"{before[2]:.3f}")
    if after[2] > before[1]:
        return (f"95% intervals separate, higher with it (it made things worse): lower bound with it {after[2]:.3f} "
                f"> upper bound without it {before[1]:.3f}")
    return (f"95% intervals overlap: with it [{after[2]:.3f}, {after[1]:.3f}], without it "
            f"[{before[2]:.3f}, {before[1]:.3f}]")


def _measured(attack: dict[str, Any], d: dict[str, Any], before: tuple[float, float, float], qname: str,
              baseline: Optional[float], num_classes: int = 0) -> Optional[dict[str, Any]]:
    after = defended_success(d, attack, baseline_accuracy=baseline)
    if after is None:
        return None
    m = d.get("metrics", {})
    cost, lat = _clean_cost(d, attack, baseline), _v(m.get("latency_added_ms_per_image"))
    train = _v(m.get("training_time_s"))
    clean = clean_metric(m)
    chance = num_classes >= 2 and clean is not None and at_chance(clean[1], num_classes=num_classes)
    helps = after[1] < before[2] and not chance
    why = (f"measured in this run: {qname} {before[0]:.3f} -> {after[0]:.3f} with {d['id']} "
           f"({_interval_words(before, after)})")
    why += "".join(s for s in (f"; clean accuracy {-cost:+.3f}" if cost is not None else "",
                               f"; latency {lat:+.2f} ms/image" if lat is not None else "",
                               f"; training {train:.0f} s" if train is not None else "") if s)
    if chance:
        why += (f"; AT CHANCE: the defended model's {clean[0]} upper 95% bound is below 1.5/K = "
                f"{chance_limit(num_classes):.3f} (K={num_classes}), so it predicts no better than guessing")
    return {"defense": d["id"], "name": d.get("name"), "evidence": "measured", "after": after[0],
            "after_upper": after[1], "clean_cost": cost, "latency_ms": lat, "training_time_s": train,
            "helps": helps, "at_chance": chance,
            "why": why if helps else why + ": it does not help against this attack"}


def _prior(p: dict[str, Any], qname: str, attack: dict[str, Any]) -> dict[str, Any]:
    """A knowledge-base entry as a candidate; a budgeted defense takes the attack's own eps and norm."""
    after = p["after"]
    params = dict(p.get("params", {}))
    for k in ("eps", "norm"):
        if k in params and k in attack.get("params", {}):
            params[k] = attack["params"][k]
    upper = after["ci95"][1] if after.get("ci95") else after["value"]
    why = (f"prior (not measured in this run): {p['after_from']}; {p['clean_note']}; reproduce with "
           f"`{p['source']}` ({p['data']}); as {qname} after the defense: {after['value']:.3f}")
    return {"defense": p["defense"], "name": p["defense"], "params": params, "evidence": "prior",
            "after": after["value"], "after_upper": upper, "clean_cost": p.get("clean_cost"), "latency_ms": None,
            "training_time_s": None, "helps": True, "why": why, "source": p["source"], "data": p["data"]}


def _key(c: dict[str, Any]) -> tuple:
    group = 0 if c["evidence"] == "measured" and c["helps"] else 1 if c["evidence"] == "prior" else 2
    return (group, c["after_upper"], c["clean_cost"] or 0.0, c["latency_ms"] or 0.0, c["defense"])


def recommend(results: dict[str, Any], *, priors: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """Per attack: whether it succeeded, every candidate defense with its evidence, ranked by the module's rule."""
    priors = load_priors() if priors is None else priors
    baseline = _v(results.get("baseline", {}).get("metrics", {}).get("clean_accuracy"))
    k = int((results.get("data") or {}).get("num_classes") or 0)
    out = []
    for a in results.get("attacks", []):
        key = quantity(a)
        qname = QUANTITIES[key].name
        got = QUANTITIES[key].before(a.get("metrics", {}), _v(a.get("metrics", {}).get("baseline", {})
                                                              .get("clean_accuracy")) or baseline)
        before = got if got else (0.0, 0.0, 0.0)
        row: dict[str, Any] = {"attack": a["id"], "name": a.get("name", a["id"]), "category": a["category"],
                               "quantity": qname, "before": before[0], "before_ci95": [before[2], before[1]],
                               "succeeded": before[0] >= SUCCESS_MIN,
                               "candidates": [], "recommended": None}
        if row["succeeded"]:
            cands = [c for d in results.get("defenses", []) if d.get("against") == a["id"]
                     for c in [_measured(a, d, before, qname, baseline, k)] if c is not None]
            seen = {c["name"] for c in cands} | {c["defense"] for c in cands}
            cands += [_prior(p, qname, a) for p in priors
                      if row["name"] in p.get("attacks", []) and p["defense"] not in seen]
            cands.sort(key=_key)
            row["candidates"] = cands
            best = cands[0] if cands and cands[0]["helps"] else None
            row["recommended"] = None if best is None else {k: best[k] for k in ("defense", "evidence", "why")}
        out.append(row)
    return {"rule": __doc__.split("Ranking rule", 1)[1].split("\n\n", 1)[1].strip(), "success_min": SUCCESS_MIN,
            "attacks": out, "at_chance": chance_flags(results)}


def recommended_profile(results: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """The run's profile with every recommended prior defense added (measured ones are in it already); one entry per
    defense and parameters, against every attack it is recommended for, so a trained defense is trained once."""
    prof = copy.deepcopy(results["profile"])
    defenses = prof.setdefault("defenses", [])
    names = {d.get("name") for d in defenses}
    added: dict[str, dict[str, Any]] = {}
    for row in rec["attacks"]:
        r = row["recommended"]
        if r is None or r["evidence"] != "prior":
            continue
        cand = next(c for c in row["candidates"] if c["defense"] == r["defense"] and c["evidence"] == "prior")
        key = yaml.safe_dump([cand["defense"], cand["params"]], sort_keys=True)
        if key in added:
            added[key]["against"].append(row["attack"])
            continue
        spec = {"name": cand["defense"], "params": dict(cand["params"]), "against": [row["attack"]]}
        if cand["defense"] in names:
            spec["id"] = f"{cand['defense']}_{row['attack']}"
        added[key] = spec
        defenses.append(spec)
        names.add(cand["defense"])
    return prof


def to_markdown(rec: dict[str, Any]) -> str:
    lines = ["# Defense recommendations", "", "Rule: " + " ".join(rec["rule"].split()), ""]
    if rec.get("at_chance"):
        lines += ["**Models at chance** (never recommended; the release gate fails them):", ""]
        lines += [f"- {f['subject']}: {f['reason']}" for f in rec["at_chance"]] + [""]
    for row in rec["attacks"]:
        head = f"## {row['attack']} ({row['category']}): {row['quantity']} = {row['before']:.3f}"
        lines += [head, ""]
        if not row["succeeded"]:
            lines += [f"Below {rec['success_min']}: the attack did not succeed, nothing to recommend.", ""]
            continue
        r = row["recommended"]
        lines.append(f"**Recommended: {r['defense']}** ({r['evidence']}): {r['why']}." if r else
                     "No candidate is shown to help: no defense measured against it in this run has a 95% "
                     "interval separate from and below the undefended one on a model above chance, and the "
                     "knowledge base has no other prior for it.")
        lines.append("")
        if row["candidates"]:
            lines += ["| rank | defense | evidence | after | upper 95% | clean cost | latency ms/image | why |",
                      "|---|---|---|---|---|---|---|---|"]
            for i, c in enumerate(row["candidates"], 1):
                fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
                lines.append(f"| {i} | {c['defense']} | {c['evidence']} | {c['after']:.3f} | {c['after_upper']:.3f} |"
                             f" {fmt(c['clean_cost'], '+.3f')} | {fmt(c['latency_ms'], '.2f')} |"
                             f" {c['why'].replace('|', '/')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write_recommendations(run_dir: Path, results: dict[str, Any], *, out: Optional[Path] = None) -> dict[str, Path]:
    """recommendations.md / .json and the profile with the recommended defenses (default RUN_DIR/recommended.yaml)."""
    from safedl.profile import parse_profile

    layout = RunDir(run_dir)
    rec = recommend(results)
    prof = recommended_profile(results, rec)
    out = Path(out) if out is not None else layout.recommended_profile
    try:
        parse_profile(prof, source=str(out))
    except UserError as exc:
        raise UserError(f"the recommended profile does not validate, nothing written: {exc}") from None
    added = len(prof.get("defenses", [])) - len(results["profile"].get("defenses", []))
    header = (f"# {results['profile'].get('name')} with {added} recommended defense(s) added by `safedl recommend`\n"
              f"# (see recommendations.md). Measure them, reusing every finished stage:\n"
              f"#   safedl run {out} --resume {layout.path}\n")
    atomic_write_json(layout.recommendations_json, rec)
    atomic_write_text(layout.recommendations_md, to_markdown(rec))
    atomic_write_text(out, header + yaml.safe_dump(prof, sort_keys=False))
    return {"markdown": layout.recommendations_md, "json": layout.recommendations_json, "profile": out}
