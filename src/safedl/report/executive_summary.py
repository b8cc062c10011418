"""The executive summary at the top of the report: the verdict, the three largest risks with the numbers that drive
them, the first three actions of ``safedl recommend``, and every shortcut the run took to be fast."""
from __future__ import annotations

from typing import Any

from safedl.decide.gate import gate_summary
from safedl.decide.recommend import recommend

Block = tuple
TOP = 3


def top_risks(results: dict[str, Any], k: int = TOP) -> list[dict[str, Any]]:
    """The ``k`` risk rows with the largest residual score (what is left after the best defense), then raw score."""
    rows = results.get("risk", {}).get("per_attack", [])
    return sorted(rows, key=lambda r: (r.get("residual_score", r["score"]), r["score"]), reverse=True)[:k]


def first_actions(results: dict[str, Any], k: int = TOP) -> list[str]:
    """The recommendations of ``recommend`` for the attacks with the largest residual risk first, as sentences."""
    order = {r["attack"]: i for i, r in enumerate(top_risks(results, k=len(results.get("attacks", []))))}
    rows = sorted(recommend(results)["attacks"], key=lambda r: order.get(r["attack"], len(order)))
    out = []
    for row in rows:
        r = row["recommended"]
        if r is None:
            continue
        verb = "keep" if r["evidence"] == "measured" else "add and measure"
        out.append(f"{verb} **{r['defense']}** against {row['attack']} ({row['quantity']} {row['before']:.3f} "
                   f"undefended; evidence: {r['evidence']}): {r['why']}")
    return out[:k]


def _verdict(results: dict[str, Any]) -> str:
    gate, risk = results["gate"], results["risk"]
    residual = f", residual after defenses **{risk['residual_level']}**" if results.get("defenses") else ""
    return f"Overall risk **{risk['overall_level']}**{residual}. {gate_summary(gate)}"


def _risk_line(r: dict[str, Any]) -> str:
    line = f"{r['attack']} ({r['category']}): {r['level']} risk (score {r['score']:.2f}), {r.get('driver', '')}"
    if "residual_driver" in r:
        line += f"; residual {r['residual_level']} ({r['residual_score']:.2f}): {r['residual_driver']}"
    else:
        line += "; no defense evaluated against it"
    return line


def shortcuts(results: dict[str, Any]) -> list[str]:
    """Every shortcut the run took (model cache reuse, early stopping, parallel stages); none weakens a number."""
    out = []
    reused = list((results.get("baseline") or {}).get("reused_models") or [])
    for e in results.get("attacks", []) + results.get("defenses", []):
        reused += [f"{e['id']}: {m}" for m in e.get("reused_models") or []]
    if reused:
        out.append(f"{len(reused)} trained model(s) loaded from the model cache instead of trained (same "
                   f"architecture, initial weights, data, recipe and seed; `safedl cache clear` empties it): "
                   + "; ".join(reused))
    stopped = [d["id"] for d in results.get("defenses", [])
               if (d.get("metrics", {}).get("strong_suite_budget") or {}).get("early_stop")]
    if stopped:
        out.append("strong adaptive suite with per-sample early stopping (a sample is no longer attacked once it is "
                   "misclassified; the success set is that of the full loop) for: " + ", ".join(stopped))
    ex = results.get("execution") or {}
    if ex.get("executor") and ex["executor"] != "serial" and (ex.get("workers") or 1) > 1:
        out.append(f"independent stages ran {ex['workers']} at a time ({ex['executor']} executor, "
                   f"{ex.get('threads_per_task')} thread(s) each); every stage seeds itself, so the numbers do not "
                   "depend on it")
    return out


def executive_summary_blocks(results: dict[str, Any]) -> list[Block]:
    """Blocks (see ``render.Block``) for the executive summary."""
    b: list[Block] = [("h", 2, "Executive summary"), ("p", "Verdict: " + _verdict(results))]
    risks = top_risks(results)
    if risks:
        b.append(("p", f"The {len(risks)} largest risks:"))
        b.append(("list", [_risk_line(r) for r in risks]))
    actions = first_actions(results)
    b.append(("p", "First actions (`safedl recommend`):" if actions else
              "First actions: `safedl recommend` recommends nothing (no attack succeeded, or no candidate is shown "
              "to help)."))
    if actions:
        b.append(("list", actions))
    cuts = shortcuts(results)
    b.append(("p", "Shortcuts this run took:" if cuts else "Shortcuts this run took: none."))
    if cuts:
        b.append(("list", cuts))
    return b
