"""Summary figures drawn from results.json: robust accuracy per attack and success after each defense, with 95% CIs."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _bar(path: Path, labels: list[str], metrics: list[dict], title: str, ylabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(lab, m) for lab, m in zip(labels, metrics) if isinstance(m, dict) and m.get("value") is not None]
    if not pts:
        return False
    vals = [float(m["value"]) for _, m in pts]
    # clamp: a Wilson bound can differ from the value by a rounding error at 0 or 1
    lo = [max(0.0, v - (m["ci95"][0] if m.get("ci95") else v)) for v, (_, m) in zip(vals, pts)]
    hi = [max(0.0, (m["ci95"][1] if m.get("ci95") else v) - v) for v, (_, m) in zip(vals, pts)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(pts) + 2), 3.2))
    ax.bar(range(len(pts)), vals, yerr=[lo, hi], capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(pts)), [lab for lab, _ in pts], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """Write the summary figures; returns label -> path relative to the run dir."""
    out: dict[str, str] = {}
    ev = [a for a in results.get("attacks", []) if a["category"] == "evasion"]
    base = results["baseline"]["metrics"].get("clean_accuracy")
    if ev:
        p = run_dir / "artifacts" / "figures" / "robust_accuracy.png"
        if _bar(p, ["clean"] + [a["id"] for a in ev], [base] + [a["metrics"].get("robust_accuracy") for a in ev],
                "Accuracy under each evasion attack (95% CI)", "accuracy"):
            out["Accuracy under each evasion attack"] = str(p.relative_to(run_dir))
    po = [a for a in results.get("attacks", []) if a["category"] != "evasion"]
    if po:
        p = run_dir / "artifacts" / "figures" / "poisoning_success.png"
        if _bar(p, [a["id"] for a in po], [a["metrics"].get("attack_success_rate") for a in po],
                "Success of each poisoning / backdoor attack (95% CI)", "attack success rate"):
            out["Success of each poisoning / backdoor attack"] = str(p.relative_to(run_dir))
    ds = results.get("defenses", [])
    if ds:
        labels, ms = [], []
        for d in ds:
            m = d["metrics"].get("attack_success_rate_after") or d["metrics"].get("robust_accuracy")
            labels.append(f"{d['id']} vs {d['against']}" + ("" if "attack_success_rate_after" in d["metrics"] else " (rob. acc.)"))
            ms.append(m)
        p = run_dir / "artifacts" / "figures" / "defenses.png"
        if _bar(p, labels, ms, "Defenses: attack success after (or robust accuracy), 95% CI", "rate"):
            out["Defenses"] = str(p.relative_to(run_dir))
    return out
