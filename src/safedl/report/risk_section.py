"""The report's risk section: the rule, the weights, and for each rating the measured number that drives it."""
from __future__ import annotations

from typing import Any

Block = tuple


def risk_blocks(risk: dict[str, Any]) -> list[Block]:
    """Blocks (see ``render.Block``) for the risk table; older results without ``driver`` still render."""
    b: list[Block] = [("h", 2, "Risk"), ("p", f"Rule: {risk['rule']}. Weights and their meaning: docs/risk.md.")]
    rows = []
    for r in risk["per_attack"]:
        rows.append([r["attack"], r["category"], f"{r['likelihood']:.2f}", f"{r['impact']:.2f}", f"{r['score']:.2f}",
                     r["level"], r.get("driver", ""), r.get("best_defense", ""),
                     f"{r['residual_score']:.2f}" if "residual_score" in r else "", r.get("residual_level", ""),
                     r.get("residual_driver", "")])
    b.append(("table", ["attack", "category", "likelihood", "impact", "score", "level", "driven by", "best defense",
                        "residual", "residual level", "residual driven by"], rows))
    notes = [f"{r['attack']}: {', '.join(r['not_comparable'])} {r['not_comparable_reason']}, so it gives no residual"
             for r in risk["per_attack"] if r.get("not_comparable")]
    drivers = risk.get("driven_by") or {}
    if drivers.get("overall"):
        notes.insert(0, f"the overall level comes from {drivers['overall']}; the residual level from "
                        f"{drivers.get('residual')}")
    if notes:
        b.append(("list", notes))
    return b
