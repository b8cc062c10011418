"""The game-day report: JSON (every number) and Markdown (a table per scenario: alert, source, fired after, target,
met), written atomically."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safedl.redteam.gameday.run import ScenarioResult
from safedl.utils.io import atomic_write_text


def summary(results: list[ScenarioResult]) -> dict[str, Any]:
    alerts = [a for r in results for a in r.alerts]
    return {"expected": len(alerts), "fired": sum(a["fired"] for a in alerts),
            "within_target": sum(a["met"] for a in alerts), "scenarios_failed": [r.name for r in results if r.error]}


def render_markdown(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    s = summary(results)
    lines = ["# Game day report", "", f"Command: `{meta['command']}`  ", f"Bundle: {meta['bundle']}  ",
             f"Started: {meta['started']} (UTC); {meta['seconds']:.0f} s in all", "",
             f"**{s['fired']} of {s['expected']} expected alerts fired, {s['within_target']} within their target.**",
             "", "A `prometheus` alert is the shipped rule's condition (deploy/prometheus/alerts.yml) checked on the "
             "service's /metrics every 0.5 s (its `for:` not waited out); a `monitor` alert is the security "
             "monitor's notification in its JSONL sink; `deployment`: the deployment's own recovery.", ""]
    for r in results:
        lines += [f"## {r.name}", "", r.summary + ".", ""]
        lines += ["| alert | source | fired | after (s) | target (s) | met |", "|---|---|---|---|---|---|"]
        for a in r.alerts:
            after = "-" if a["after_s"] is None else f"{a['after_s']:.1f}"
            lines.append(f"| {a['alert']} | {a['source']} | {'yes' if a['fired'] else 'no'} | {after} | "
                         f"{a['target_s']:g} | {'yes' if a['met'] else '**no**'} |")
        lines += ["", f"Action: `{json.dumps(r.action, sort_keys=True)}`  "]
        lines.append(f"Other monitor alerts in the window: {', '.join(r.also_fired) or 'none'}  ")
        if r.error:
            lines.append(f"**The action failed:** {r.error}  ")
        lines += [f"Scenario time: {r.seconds:.1f} s", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "gameday.md", out_dir / "gameday.json"
    atomic_write_text(js, json.dumps({"meta": meta, "summary": summary(results),
                                      "scenarios": [asdict(r) for r in results]}, indent=2))
    atomic_write_text(md, render_markdown(results, meta))
    return md, js
