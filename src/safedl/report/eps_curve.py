"""Robustness vs eps: for every eps sweep (attacks ``<id>@<eps>``, see :mod:`safedl.sweeps`), robust accuracy of
the undefended model and of each defense evaluated against the sweep, over eps, with 95% Wilson intervals as error
bars; drawn from results.json alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safedl.rundir import RunDir
from safedl.sweeps import split_sweep_id

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def sweep_groups(attacks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Swept id -> its attack entries sorted by eps (only ids ``<id>@<eps>`` whose scalar ``params.eps`` is that
    eps, and only groups of two or more values)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in attacks:
        parts = split_sweep_id(str(a.get("id", "")))
        eps = a.get("params", {}).get("eps")
        if parts is None or isinstance(eps, bool) or not isinstance(eps, (int, float)) or f"{float(eps):g}" != parts[1]:
            continue
        groups.setdefault(parts[0], []).append(a)
    return {k: sorted(v, key=lambda a: float(a["params"]["eps"])) for k, v in groups.items() if len(v) >= 2}


def curves(group: list[dict[str, Any]], defenses: list[dict[str, Any]]) -> dict[str, list[tuple[float, dict]]]:
    """Label -> [(eps, robust-accuracy metric)]: the undefended model, then each defense against every value."""
    eps_of = {a["id"]: float(a["params"]["eps"]) for a in group}
    out = {"undefended": [(eps_of[a["id"]], a["metrics"]["robust_accuracy"]) for a in group
                          if "robust_accuracy" in a.get("metrics", {})]}
    for d in defenses:
        m = d.get("metrics", {}).get("robust_accuracy")
        if d.get("against") in eps_of and m is not None:
            out.setdefault(f"with {d['id']} (adaptive)", []).append((eps_of[d["against"]], m))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items() if v}


def curve_figure(path: Path, lines: dict[str, list[tuple[float, dict]]], *, title: str) -> bool:
    """Robust accuracy over eps, one line per label, error bars from each metric's ci95; False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, (label, pts) in enumerate(lines.items()):
        eps = [p[0] for p in pts]
        v = [p[1]["value"] for p in pts]
        err = [[max(0.0, p[1]["value"] - p[1]["ci95"][0]) for p in pts],
               [max(0.0, p[1]["ci95"][1] - p[1]["value"]) for p in pts]]
        ax.errorbar(eps, v, yerr=err, marker="o", ms=3, capsize=3, color=COLORS[k % len(COLORS)], label=label)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def eps_curve_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """One figure per eps sweep; label -> path relative to the run directory."""
    out: dict[str, str] = {}
    figdir = RunDir(run_dir).figures
    for base, group in sweep_groups(results.get("attacks", [])).items():
        path = figdir / f"eps_sweep_{base}.png"
        norm = group[0].get("params", {}).get("norm", "linf")
        if curve_figure(path, curves(group, results.get("defenses", [])),
                        title=f"{base}: robust accuracy vs eps ({norm}), 95% CI"):
            out[f"Robustness vs eps: {base} ({len(group)} values)"] = str(path.relative_to(run_dir))
    return out
