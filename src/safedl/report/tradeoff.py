"""The defense trade-off figure: clean accuracy vs adaptive robust accuracy vs added latency, Pareto front marked.

One figure per evasion attack that defenses were evaluated against. A defense is Pareto-optimal when no other option
(including "no defense") is at least as good on all three of clean accuracy (higher), adaptive robust accuracy
(higher) and added latency (lower) and better on one. Single defenses are circles, layered pipelines squares.
"""
from __future__ import annotations

from safedl.rundir import RunDir

from pathlib import Path
from typing import Any


def _v(m: Any) -> float | None:
    return float(m["value"]) if isinstance(m, dict) and m.get("value") is not None else None


def tradeoff_points(results: dict[str, Any], attack_id: str) -> list[dict[str, Any]]:
    """The undefended system and each evasion defense against ``attack_id``, with a ``pareto`` flag."""
    attack = next(a for a in results.get("attacks", []) if a["id"] == attack_id)
    pts = [{"label": "no defense", "clean": _v(attack["metrics"].get("clean_accuracy")),
            "robust": _v(attack["metrics"].get("robust_accuracy")), "latency": 0.0, "layered": False}]
    for d in results.get("defenses", []):
        m = d.get("metrics", {})
        if d.get("against") != attack_id or _v(m.get("robust_accuracy")) is None:
            continue
        pts.append({"label": d["id"], "clean": _v(m.get("clean_accuracy")), "robust": _v(m.get("robust_accuracy")),
                    "latency": _v(m.get("latency_added_ms_per_image")) or 0.0,
                    "layered": d.get("kind") == "pipeline" or len(d.get("components", [])) > 1})
    pts = [p for p in pts if p["clean"] is not None and p["robust"] is not None]

    def dominates(q: dict, p: dict) -> bool:
        ge = q["clean"] >= p["clean"] and q["robust"] >= p["robust"] and q["latency"] <= p["latency"]
        return ge and (q["clean"] > p["clean"] or q["robust"] > p["robust"] or q["latency"] < p["latency"])

    for p in pts:
        p["pareto"] = not any(dominates(q, p) for q in pts if q is not p)
    return pts


def _figure(path: Path, pts: list[dict[str, Any]], attack_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lat = [max(0.0, p["latency"]) for p in pts]
    top = max(lat) or 1.0
    for p, l in zip(pts, lat):
        ax.scatter(p["clean"], p["robust"], s=40 + 260 * l / top, marker="s" if p["layered"] else "o",
                   c="#c44e52" if p["pareto"] else "#8c8c8c", edgecolors="black" if p["pareto"] else "none",
                   alpha=0.85, zorder=3)
        ax.annotate(f"{p['label']}{' (Pareto)' if p['pareto'] else ''}\n{p['latency']:+.2f} ms",
                    (p["clean"], p["robust"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["clean"])
    if len(front) > 1:
        ax.plot([p["clean"] for p in front], [p["robust"] for p in front], "--", color="#c44e52", lw=1, zorder=2)
    ax.set_xlabel("clean accuracy of the defended system")
    ax.set_ylabel(f"adaptive robust accuracy under {attack_id}")
    ax.set_title(f"Defense trade-off against {attack_id} (red: Pareto-optimal; size: added latency; "
                 "square: layered)", fontsize=8)
    ax.set_xlim(min(p["clean"] for p in pts) - 0.05, min(1.02, max(p["clean"] for p in pts) + 0.12))
    ax.set_ylim(-0.03, min(1.05, max(p["robust"] for p in pts) + 0.15))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tradeoff_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """label -> path (relative to the run dir) of each attack's trade-off figure."""
    out: dict[str, str] = {}
    attacks = {d["against"] for d in results.get("defenses", []) if _v(d.get("metrics", {}).get("robust_accuracy")) is not None}
    for aid in sorted(attacks):
        if not any(a["id"] == aid for a in results.get("attacks", [])):
            continue
        pts = tradeoff_points(results, aid)
        if len(pts) < 2:
            continue
        path = RunDir(run_dir).figures / f"tradeoff_{aid}.png"
        _figure(path, pts, aid)
        front = ", ".join(p["label"] for p in pts if p["pareto"])
        out[f"Defense trade-off against {aid}: clean vs adaptive robust accuracy vs latency (Pareto-optimal: {front})"] = \
            str(path.relative_to(run_dir))
    return out
