"""Summary figures drawn from results.json alone: accuracy under each evasion attack, success of each poisoning
attack, and each defense next to the undefended system, all with 95% intervals."""
from __future__ import annotations

from safedl.rundir import RunDir

from pathlib import Path
from typing import Any

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]


def _value(m: Any) -> float | None:
    return float(m["value"]) if isinstance(m, dict) and m.get("value") is not None else None


def grouped_bars_figure(groups: list[str], series: dict[str, list[Any]], *, title: str, ylabel: str, xlabel: str):
    """(figure, axes) with one cluster of bars per group, one bar per series, error bars from each metric's ci95; the
    legend sits right of the axes, so it covers neither the bars, the tick labels nor the axis label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * (len(series) + 1) + 2.0), 4.0))
    for k, (name, ms) in enumerate(series.items()):
        xs, vals, lo, hi = [], [], [], []
        for i, m in enumerate(ms):
            v = _value(m)
            if v is None:
                continue
            ci = m.get("ci95") or [v, v]
            xs.append(i + (k - (len(series) - 1) / 2) * width)
            vals.append(v)
            # clamp: a Wilson bound can differ from the value by a rounding error at 0 or 1
            lo.append(max(0.0, v - (ci[0] if ci[0] is not None else v)))
            hi.append(max(0.0, (ci[1] if ci[1] is not None else v) - v))
        ax.bar(xs, vals, width=width, yerr=[lo, hi], capsize=2, color=_COLORS[k % len(_COLORS)], label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return fig, ax


def _grouped_bars(path: Path, groups: list[str], series: dict[str, list[Any]], *, title: str, ylabel: str,
                  xlabel: str) -> bool:
    """Draw :func:`grouped_bars_figure` into ``path``. False if there is nothing to draw."""
    import matplotlib.pyplot as plt

    if not groups or all(_value(m) is None for ms in series.values() for m in ms):
        return False
    fig, _ = grouped_bars_figure(groups, series, title=title, ylabel=ylabel, xlabel=xlabel)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def _success(metrics: dict[str, Any]) -> Any:
    """The attack's own success measure: backdoor ASR, or targeted misclassification for label flipping."""
    return metrics.get("attack_success_rate") or metrics.get("targeted_success_rate")


def summary_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """Write the summary figures; returns label -> path relative to the run dir."""
    out: dict[str, str] = {}
    figdir = RunDir(run_dir).figures
    data = (results.get("data") or {}).get("name")
    on = f" on {data}" if data else ""
    attacks = {a["id"]: a for a in results.get("attacks", [])}
    ev = [a for a in attacks.values() if a["category"] == "evasion"]
    base = results["baseline"]["metrics"].get("clean_accuracy")
    if ev and _grouped_bars(figdir / "robust_accuracy.png", ["no attack"] + [a["id"] for a in ev],
                            {"accuracy": [base] + [a["metrics"].get("robust_accuracy") for a in ev]},
                            title=f"Accuracy under each evasion attack{on} (95% CI)", ylabel="accuracy",
                            xlabel="evasion attack (eval images)"):
        out["Accuracy under each evasion attack"] = str((figdir / "robust_accuracy.png").relative_to(run_dir))
    po = [a for a in attacks.values() if a["category"] != "evasion"]
    if po and _grouped_bars(figdir / "poisoning_success.png", [a["id"] for a in po],
                            {"baseline model": [a["metrics"].get("baseline", {}).get("attack_success_rate")
                                                or a["metrics"].get("baseline", {}).get("targeted_success_rate")
                                                for a in po],
                             "poisoned model": [_success(a["metrics"]) for a in po]},
                            title=f"Success of each poisoning / backdoor attack{on} (95% CI)",
                            ylabel="attack success rate", xlabel="poisoning / backdoor attack"):
        out["Success of each poisoning / backdoor attack"] = str((figdir / "poisoning_success.png").relative_to(run_dir))

    defenses = results.get("defenses", [])
    evd = [d for d in defenses if "robust_accuracy" in d["metrics"]]
    if evd and _grouped_bars(
            figdir / "evasion_defenses.png", [f"{d['id']} vs {d['against']}" for d in evd],
            {"undefended": [attacks.get(d["against"], {}).get("metrics", {}).get("robust_accuracy") for d in evd],
             "defended, attack on undefended model": [d["metrics"].get("robust_accuracy_nonadaptive") for d in evd],
             "defended, adaptive attack": [d["metrics"].get("robust_accuracy") for d in evd]},
            title=f"Evasion defenses{on}: robust accuracy (higher is better, 95% CI)", ylabel="robust accuracy",
            xlabel="defense vs attack"):
        out["Evasion defenses: robust accuracy"] = str((figdir / "evasion_defenses.png").relative_to(run_dir))
    pod = [d for d in defenses if "attack_success_rate_after" in d["metrics"]]
    if pod and _grouped_bars(
            figdir / "poisoning_defenses.png", [f"{d['id']} vs {d['against']}" for d in pod],
            {"before": [_success(attacks.get(d["against"], {}).get("metrics", {})) for d in pod],
             "after": [d["metrics"].get("attack_success_rate_after") for d in pod]},
            title=f"Poisoning defenses{on}: attack success (lower is better, 95% CI)", ylabel="attack success rate",
            xlabel="defense vs attack"):
        out["Poisoning defenses: attack success before and after"] = str(
            (figdir / "poisoning_defenses.png").relative_to(run_dir))
    return out
