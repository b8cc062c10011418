"""Extraction curves: fidelity and stolen-model accuracy over the query budget, with and without each defense,
drawn from results.json alone (95% Wilson intervals as shaded bands)."""
from __future__ import annotations

from safedl.rundir import RunDir

from pathlib import Path
from typing import Any

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def curve_figure(path: Path, curves: dict[str, list[dict[str, Any]]], *, title: str) -> bool:
    """Two panels (fidelity, surrogate accuracy) over the budget, one line per curve; False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    for ax, metric in zip(axes, ("fidelity", "surrogate_accuracy")):
        for k, (label, pts) in enumerate(curves.items()):
            b = [p["budget"] for p in pts]
            v = [p[metric]["value"] for p in pts]
            lo = [p[metric]["ci95"][0] for p in pts]
            hi = [p[metric]["ci95"][1] for p in pts]
            color = _COLORS[k % len(_COLORS)]
            ax.plot(b, v, marker="o", ms=3, color=color, label=label)
            ax.fill_between(b, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("queries")
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def extraction_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """One figure per extraction attack: its undefended curve and the curve under each defense evaluated against it."""
    out: dict[str, str] = {}
    figdir = RunDir(run_dir).figures
    for a in results.get("attacks", []):
        if a.get("category") != "extraction" or not a.get("curve"):
            continue
        curves = {"undefended": a["curve"]}
        for d in results.get("defenses", []):
            if d.get("against") == a["id"] and d.get("curve_after"):
                curves[f"with {d['id']}"] = d["curve_after"]
        path = figdir / f"extraction_{a['id']}.png"
        if curve_figure(path, curves, title=f"Model extraction {a['id']}: with and without each defense (95% CI)"):
            out[f"Model extraction {a['id']} over the query budget"] = str(path.relative_to(run_dir))
    return out
