"""The operations report of ``safedl monitor report``: Markdown and HTML with PNG trend charts (requests, attacks
blocked, attack rate with its 95% interval, flagged keys, alerts by rule, time to detect and to mitigate), rendered
from the data of serve/monitor/weekly.py alone (a plain dict: the report takes data, not a store)."""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from safedl.utils.io import atomic_write_text

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
FIGURES = {"requests": "Requests per day", "blocked": "Attacks blocked per day (images rejected)",
           "attack_rate": "Attack rate per day (blocked / images, 95% Wilson interval)",
           "flagged_keys": "Flagged keys per day (a rejected image)", "alerts": "Alerts per day by rule",
           "response_times": "Time to detect and to mitigate per alert (seconds, log scale)"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72, metadata={"Software": None})  # no timestamp: the same data gives the same bytes
    _plt().close(fig)


def _bars(path: Path, dates: list[str], values: list[float], *, title: str, ylabel: str) -> None:
    fig, ax = _plt().subplots(figsize=(6.0, 2.6))
    ax.bar(range(len(dates)), values, color=_COLORS[0])
    ax.set_xticks(range(len(dates)), [d[5:] for d in dates], fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _rate(path: Path, days: list[dict]) -> None:
    fig, ax = _plt().subplots(figsize=(6.0, 2.6))
    xs = [i for i, d in enumerate(days) if d["attack_rate"]["value"] is not None]
    vals = [days[i]["attack_rate"]["value"] for i in xs]
    lo = [max(0.0, v - days[i]["attack_rate"]["ci95"][0]) for i, v in zip(xs, vals)]
    hi = [max(0.0, days[i]["attack_rate"]["ci95"][1] - v) for i, v in zip(xs, vals)]
    ax.errorbar(xs, vals, yerr=[lo, hi], fmt="o-", capsize=3, color=_COLORS[3], ms=4)
    ax.set_xticks(range(len(days)), [d["date"][5:] for d in days], fontsize=7)
    ax.set_ylim(0, max([v + h for v, h in zip(vals, hi)] + [0.05]) * 1.1)
    ax.set_ylabel("share of images", fontsize=8)
    ax.set_title(FIGURES["attack_rate"], fontsize=9)
    _save(fig, path)


def _alerts(path: Path, days: list[dict], rules: list[str]) -> None:
    fig, ax = _plt().subplots(figsize=(6.0, 2.6))
    bottom = [0] * len(days)
    for k, rule in enumerate(rules):
        vals = [d["alerts"].get(rule, 0) for d in days]
        ax.bar(range(len(days)), vals, bottom=bottom, color=_COLORS[k % len(_COLORS)], label=rule)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(days)), [d["date"][5:] for d in days], fontsize=7)
    ax.set_ylabel("alerts", fontsize=8)
    ax.set_title(FIGURES["alerts"], fontsize=9)
    if rules:
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    _save(fig, path)


def _times(path: Path, data: dict) -> None:
    fig, ax = _plt().subplots(figsize=(6.0, 2.6))
    index = {d["date"]: i for i, d in enumerate(data["days"])}
    for k, (field, label) in enumerate((("ttd_s", "time to detect"), ("ttm_s", "time to mitigate"))):
        pts = [(index[t["date"]] + (k - 0.5) * 0.2, max(t[field], 0.1)) for t in data["timings"]
               if t[field] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=_COLORS[k], label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(data["days"])), [d["date"][5:] for d in data["days"]], fontsize=7)
    ax.set_xlim(-0.5, len(data["days"]) - 0.5)
    ax.set_ylabel("seconds", fontsize=8)
    ax.set_title(FIGURES["response_times"], fontsize=9)
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    _save(fig, path)


def write_figures(data: dict, out: Path) -> dict[str, str]:
    """The PNG charts under ``out/figures``; returns name -> path relative to ``out``."""
    days, dates = data["days"], [d["date"] for d in data["days"]]
    fig_dir = out / "figures"
    for name, ylabel in (("requests", "requests"), ("blocked", "images"), ("flagged_keys", "keys")):
        _bars(fig_dir / f"{name}.png", dates, [d[name] for d in days], title=FIGURES[name], ylabel=ylabel)
    _rate(fig_dir / "attack_rate.png", days)
    _alerts(fig_dir / "alerts.png", days, data["rules"])
    _times(fig_dir / "response_times.png", data)
    return {name: f"figures/{name}.png" for name in FIGURES}


def _fmt_rate(m: dict) -> str:
    if m["value"] is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}] (n={m['n']})"


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _day_table(data: dict) -> tuple[list[str], list[list[str]]]:
    head = ["date", "requests", "images", "blocked", "attack rate [95% CI] (n)", "flagged keys", "alerts"]
    rows = [[d["date"], str(d["requests"]), str(d["images"]), str(d["blocked"]), _fmt_rate(d["attack_rate"]),
             str(d["flagged_keys"]), ", ".join(f"{r}: {n}" for r, n in d["alerts"].items() if n) or "-"]
            for d in data["days"]]
    return head, rows


def _period(data: dict) -> str:
    start = dt.datetime.fromtimestamp(data["since"], dt.timezone.utc).date()
    end = dt.datetime.fromtimestamp(data["until"], dt.timezone.utc).date() - dt.timedelta(days=1)
    return f"{start.isoformat()} to {end.isoformat()} (UTC, {len(data['days'])} days)"


def _summary_lines(data: dict) -> list[str]:
    s = data["summary"]
    return [f"requests: {s['requests']}; images: {s['images']}; blocked: {s['blocked']}",
            f"attack rate: {_fmt_rate(s['attack_rate'])}",
            f"alerts: {data['alerts']}; timed on a key: {s['ttd_n']}",
            f"time to detect, median: {_fmt_s(s['ttd_median_s'])} (n={s['ttd_n']})",
            f"time to mitigate, median: {_fmt_s(s['ttm_median_s'])} (n={s['ttm_n']}; not mitigated: "
            f"{s['not_mitigated']})"]


DEFINITIONS = ("Time to detect: an alert's start minus its key's first flag (the first image of that key the "
               "pipeline rejected in the 24 h before the alert; without one, the key's first request then). Time "
               "to mitigate: the first action on that key (the monitor's throttle / labels_only / block, or an "
               "operator's) after its first flag, minus the first flag.")


def render_markdown(data: dict, figures: dict[str, str], *, source: str) -> str:
    head, rows = _day_table(data)
    lines = [f"# Security operations report: {_period(data)}", "", f"Source: `{source}`.", "", "## Summary", ""]
    lines += [f"- {x}" for x in _summary_lines(data)] + ["", "## Per day", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Trends", ""] + [f"![{FIGURES[n]}]({p})" for n, p in figures.items()]
    lines += ["", "## Definitions", "", DEFINITIONS, ""]
    return "\n".join(lines)


def render_html(data: dict, figures: dict[str, str], *, source: str) -> str:
    e = html.escape
    head, rows = _day_table(data)
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    figs = "".join(f'<figure><img src="{e(p)}" alt="{e(FIGURES[n])}"><figcaption>{e(FIGURES[n])}</figcaption>'
                   f"</figure>" for n, p in figures.items())
    summary = "".join(f"<li>{e(x)}</li>" for x in _summary_lines(data))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_period(data))}</title>"
            f"<style>{style}</style></head><body><h1>Security operations report: {e(_period(data))}</h1>"
            f"<p>Source: <code>{e(source)}</code></p><h2>Summary</h2><ul>{summary}</ul><h2>Per day</h2>{table}"
            f"<h2>Trends</h2>{figs}<h2>Definitions</h2><p>{e(DEFINITIONS)}</p></body></html>\n")


def write_report(data: dict, out: str | Path, *, source: str) -> dict[str, Path]:
    """``ops_report.md``, ``ops_report.html``, ``ops_report.json`` (the data) and ``figures/*.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(data, out)
    paths = {"markdown": out / "ops_report.md", "html": out / "ops_report.html", "json": out / "ops_report.json"}
    atomic_write_text(paths["markdown"], render_markdown(data, figures, source=source))
    atomic_write_text(paths["html"], render_html(data, figures, source=source))
    atomic_write_text(paths["json"], json.dumps(data, indent=1, sort_keys=True) + "\n")
    return paths
