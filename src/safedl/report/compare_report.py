"""Markdown / HTML of ``safedl compare`` (the report's block format), with a trend figure across runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safedl.report.render import fmt_metric, to_html, to_markdown
from safedl.utils.io import atomic_write_json, atomic_write_text


def trend_figure(path: Path, runs: list[tuple[str, dict[str, Any]]], metrics: list[str]) -> bool:
    """One line per metric across the runs (in the given order), with 95% intervals; False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safedl.decide.compare import run_metrics

    per_run = [run_metrics(res) for _, res in runs]
    keys = [k for k in metrics if any(k in m for m in per_run)]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(runs) + 3), 4.2))
    xs = range(len(runs))
    for key in keys:
        pts = [(i, m[key].value) for i, m in enumerate(per_run) if key in m]
        vals = [v["value"] for _, v in pts]
        lo = [max(0.0, v["value"] - (v.get("ci95") or [v["value"]] * 2)[0]) for _, v in pts]
        hi = [max(0.0, (v.get("ci95") or [v["value"]] * 2)[1] - v["value"]) for _, v in pts]
        ax.errorbar([i for i, _ in pts], vals, yerr=[lo, hi], marker="o", capsize=3, label=key)
    ax.set_xticks(list(xs), [n for n, _ in runs], rotation=15, ha="right", fontsize=8)
    ax.set_xlabel("run (reference first)")
    ax.set_ylabel("proportion (95% CI)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Metrics across runs", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def comparison_blocks(cmp: dict[str, Any], figure: str | None) -> list[tuple]:
    b: list[tuple] = [("h", 1, "safedl comparison"),
                      ("p", f"Reference: `{cmp['reference']}`; compared: {', '.join(f'`{r}`' for r in cmp['runs'][1:])}. "
                            f"alpha = {cmp['alpha']} (Holm-adjusted within each comparison)."),
                      ("p", " ".join(cmp["method"].split()))]
    b.append(("p", f"**Regressions: {len(cmp['regressions'])}**" + (":" if cmp["regressions"] else ".")))
    if cmp["regressions"]:
        b.append(("list", cmp["regressions"]))
    for c in cmp["comparisons"]:
        b.append(("h", 2, f"{c['run']} vs {cmp['reference']}"))
        rows = [[r["metric"], fmt_metric(r["a"]), fmt_metric(r["b"]), f"{r['diff']:+.4f}", r["test"],
                 (f"{r['discordant']['only_a']} / {r['discordant']['only_b']}" if "discordant" in r else ""),
                 f"{r['p']:.3g}", f"{r['p_holm']:.3g}", r["verdict"]] for r in c["rows"]]
        b.append(("table", ["metric", cmp["reference"], c["run"], "difference", "test",
                            "only reference / only new right", "p", "p (Holm)", "verdict"], rows))
    if figure:
        b += [("h", 2, "Trend"), ("img", "Metrics across runs (95% intervals)", figure)]
    return b


def write_comparison(cmp: dict[str, Any], runs: list[tuple[str, dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    figure = None
    if len(runs) > 2:
        keys = sorted({r["metric"] for c in cmp["comparisons"] for r in c["rows"]})
        if trend_figure(out_dir / "trend.png", runs, keys):
            figure = "trend.png"
    blocks = comparison_blocks(cmp, figure)
    atomic_write_json(out_dir / "comparison.json", cmp)
    atomic_write_text(out_dir / "comparison.md", to_markdown(blocks))
    atomic_write_text(out_dir / "comparison.html", to_html(blocks, "safedl comparison"))
    return {"markdown": out_dir / "comparison.md", "html": out_dir / "comparison.html", "json": out_dir / "comparison.json"}
