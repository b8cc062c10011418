"""Render results.json into report.md and report.html (the same blocks, two formats)."""
from __future__ import annotations

import html as _html
import math
from pathlib import Path
from typing import Any

from safedl.utils.io import atomic_write_text
from safedl.rundir import RunDir

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", label, path) | ("list", items)


def fmt_metric(m: Any) -> str:
    """value [lo, hi] (n=N) for a metric dict; plain text otherwise."""
    if isinstance(m, dict) and "value" in m:
        v = m["value"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        s = f"{v:.4g}" if abs(v) >= 10 else f"{v:.3f}"
        ci = m.get("ci95")
        if ci and ci[0] is not None and not (isinstance(ci[0], float) and math.isnan(ci[0])):
            s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        if m.get("n") is not None:
            s += f" (n={m['n']})"
        return s
    if isinstance(m, float):
        return f"{m:.4g}"
    return str(m)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict) and "value" not in v:
            out.update(flatten(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


_ATTACK_COLS = ("clean_accuracy", "robust_accuracy", "attack_success_rate", "targeted_success_rate",
                "perturbation.linf_mean", "perturbation.l2_mean", "queries_median")


def _gate_label(gate: dict[str, Any]) -> str:
    if not gate.get("configured", True):
        return "NOT CONFIGURED"
    return "PASSED" if gate["passed"] else "FAILED"


def _data_sentence(results: dict[str, Any]) -> str:
    prof, d = results["profile"], results["data"]
    names = d.get("class_names") or []
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    source = f" from `{d['path']}`" if d.get("path") else ""
    model = prof["model"].get("arch") or prof["model"].get("entry_point") or prof["model"].get("torchscript")
    return (f"Data: **{d['name']}**{source}, {'x'.join(map(str, d['shape']))}, {d['num_classes']} classes"
            + (f" ({shown})" if names else "")
            + f"; train/val/test = {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']} "
              f"(seed {prof['seed']}). Model: {model}. "
              "Every interval is a 95% interval (Wilson for proportions); n is the number of samples it rests on.")


def build_blocks(results: dict[str, Any], figures: dict[str, str]) -> list[Block]:
    """The report as blocks: summary, baseline, figures, attacks, defenses, failed stages, risk, gate, environment."""
    from safedl.report.honesty import chance_blocks, confusion_blocks, evasion_confusion_blocks
    from safedl.report.executive_summary import executive_summary_blocks
    from safedl.report.risk_section import risk_blocks

    names = (results.get("data") or {}).get("class_names")
    summary = _summary_blocks(results)
    b = summary[:1] + executive_summary_blocks(results) + summary[1:] + _baseline_blocks(results["baseline"], names)
    if figures:
        b.append(("h", 2, "Summary figures"))
        b += [("img", label, path) for label, path in figures.items()]
    b += chance_blocks(results)  # models at chance, before any number that rests on them (issue 30)
    b += _attack_blocks(results["attacks"], names)
    b += _defense_blocks(results["defenses"], names)
    b += confusion_blocks(results)
    b += evasion_confusion_blocks(results)
    if results.get("failed_stages"):
        b.append(("h", 2, "Failed stages"))
        b.append(("p", "These stages raised, or lost their worker, on every attempt; they are not measured."))
        b.append(("table", ["stage", "attempts", "error"],
                  [[f["stage"], str(f.get("attempts", "")), f.get("error") or ""] for f in results["failed_stages"]]))
    b += risk_blocks(results["risk"])
    b += _gate_blocks(results["gate"])
    env = results["environment"]
    b.append(("h", 2, "Environment"))
    b.append(("p", ", ".join(f"{k} {v}" for k, v in env.items())))
    return b


def _summary_blocks(results: dict[str, Any]) -> list[Block]:
    """Title, the one-paragraph verdict (gate, risk), the threat model and the data sentence."""
    from safedl.decide.gate import gate_summary

    prof, gate = results["profile"], results["gate"]
    b: list[Block] = [("h", 1, f"safedl report: {prof['name']}")]
    b.append(("p", f"Run `{results['run_id']}`, created {results.get('created', '')}. "
                   f"Release gate: **{_gate_label(gate)}**. "
                   f"Overall risk: **{results['risk']['overall_level']}**"
                   + (f", residual after defenses: **{results['risk']['residual_level']}**." if results["defenses"] else ".")
                   + f" {gate_summary(gate)}"
                   + ("" if results["attacks"] else " **No attack was run** (baseline_only): this run measures the "
                      "baseline alone and says nothing about robustness.")))
    tm = prof["threat_model"]
    b.append(("p", "Threat model: " + ", ".join(f"{k}={v}" for k, v in tm.items()) + "."))
    b.append(("p", _data_sentence(results)))
    return b


def _baseline_blocks(base: dict[str, Any], names: list[str] | None) -> list[Block]:
    b: list[Block] = [("h", 2, "Baseline")]
    rows = [[k, fmt_metric(v)] for k, v in flatten(base["metrics"]).items()]
    rows.append(["training time (s)", f"{base.get('time_s', 0):.1f}"])
    b.append(("table", ["metric", "value"], rows))
    if base.get("per_class"):
        b += _per_class(base["per_class"], names)
    if base.get("notes"):
        b.append(("list", list(base["notes"])))
    return b


def _attack_blocks(attacks: list[dict[str, Any]], names: list[str] | None) -> list[Block]:
    """The attacks table, then one section per attack (parameters, metrics, per class, notes, artifacts)."""
    if not attacks:
        return []
    b: list[Block] = [("h", 2, "Attacks")]
    rows = []
    for a in attacks:
        fm = flatten(a["metrics"])
        rows.append([a["id"], a["category"], a.get("access", "")] + [fmt_metric(fm[c]) if c in fm else "" for c in _ATTACK_COLS]
                    + [f"{a.get('time_s', 0):.1f}"])
    b.append(("table", ["attack", "category", "access"] + list(_ATTACK_COLS) + ["time (s)"], rows))
    for a in attacks:
        b.append(("h", 3, f"Attack {a['id']} ({a['name']}, {a['category']})"))
        b.append(("p", "Parameters: " + (", ".join(f"{k}={v}" for k, v in a.get("params", {}).items()) or "defaults")))
        rows = [[k, fmt_metric(v)] for k, v in flatten(a["metrics"]).items()]
        b.append(("table", ["metric", "value"], rows))
        if a.get("broken_by"):
            b.append(("table", ["ensemble member", "samples it broke first"], _broken_by_rows(a)))
        if a.get("per_class"):
            b += _per_class(a["per_class"], names)
        if a.get("notes"):
            b.append(("list", list(a["notes"])))
        b += [("img", label, path) for label, path in a.get("artifacts", {}).items()]
    return b


def _defense_blocks(defenses: list[dict[str, Any]], names: list[str] | None) -> list[Block]:
    """The defenses table (up to 10 metric columns), then one section per (defense, attack) pair."""
    if not defenses:
        return []
    b: list[Block] = [("h", 2, "Defenses")]
    cols = sorted({k for dd in defenses for k in flatten(dd["metrics"])},
                  key=lambda c: (c not in _DEF_ORDER, _DEF_ORDER.index(c) if c in _DEF_ORDER else 0, c))[:10]
    rows = [[dd["id"], dd.get("kind", ""), dd["against"]] + [fmt_metric(flatten(dd["metrics"]).get(c, "")) for c in cols]
            + [f"{dd.get('time_s', 0):.1f}"] for dd in defenses]
    b.append(("table", ["defense", "kind", "against"] + cols + ["time (s)"], rows))
    for dd in defenses:
        b.append(("h", 3, f"Defense {dd['id']} ({dd.get('kind', '')}) vs {dd['against']}"))
        if dd.get("params"):
            b.append(("p", "Parameters: " + ", ".join(f"{k}={v}" for k, v in dd["params"].items())))
        b.append(("table", ["metric", "value"], [[k, fmt_metric(v)] for k, v in flatten(dd["metrics"]).items()]))
        if dd.get("per_class"):
            b += _per_class(dd["per_class"], names)
        if dd.get("notes"):
            b.append(("list", list(dd["notes"])))
        b += [("img", label, path) for label, path in dd.get("artifacts", {}).items()]
    return b


def _gate_blocks(gate: dict[str, Any]) -> list[Block]:
    """The gate's verdict, the sentence saying what it checked, and one row per check (older results: failures)."""
    from safedl.decide.gate import gate_summary

    b: list[Block] = [("h", 2, "Release gate"), ("p", f"**{_gate_label(gate)}**. {gate_summary(gate)}")]
    checks = gate.get("checks")
    if checks:
        rows = [[c["name"], c["metric"], f"{c['op']} {c['threshold']:g}",
                 "n/a" if c.get("value") is None else f"{c['value']:.4f}", c.get("bound", "point"),
                 "pass" if c["passed"] else "FAIL", c.get("reason", "")] for c in checks]
        b.append(("table", ["check", "metric", "threshold", "value", "compared", "result", "reason"], rows))
    elif gate.get("failures"):
        b.append(("list", gate["failures"]))
    return b


def _broken_by_rows(attack: dict[str, Any]) -> list[list[str]]:
    """Ensemble members and the samples each broke first; "not broken" split into the samples the model already
    misclassified before the attack and the ones that withstood every member."""
    rows = [[k, str(v)] for k, v in attack["broken_by"].items() if k != "not broken"]
    if "not broken" in attack["broken_by"]:
        total = int(attack["broken_by"]["not broken"])
        clean = attack.get("metrics", {}).get("clean_accuracy")
        if isinstance(clean, dict) and clean.get("n") and clean.get("value") is not None:
            wrong = int(round(clean["n"] * (1 - clean["value"])))
            rows.append(["not broken: already misclassified before the attack", str(wrong)])
            rows.append(["not broken: withstood every member", str(max(0, total - wrong))])
        else:
            rows.append(["not broken (includes samples misclassified before the attack)", str(total)])
    return rows


_DEF_ORDER = ["clean_accuracy", "clean_accuracy_after", "robust_accuracy", "verified_accuracy", "robust_accuracy_nonadaptive",
              "attack_success_rate_after", "detection.tpr", "detection.fpr", "detection.precision", "detection.recall",
              "detection.f1", "detection.auroc"]


def _per_class(per_class: dict[str, list], class_names: list[str] | None = None) -> list[Block]:
    names = list(per_class)
    k = max(len(v) for v in per_class.values())
    # A column of whole numbers above 1 holds counts (flagged, true_poison): print them as integers.
    counts = {n: all(isinstance(v, (int, float)) and float(v).is_integer() for v in per_class[n] if v is not None)
              and any(isinstance(v, (int, float)) and v > 1 for v in per_class[n]) for n in names}

    def cell(n: str, c: int) -> str:
        v = per_class[n][c] if c < len(per_class[n]) else None
        if not isinstance(v, (int, float)):
            return ""
        return f"{int(v)}" if counts[n] else f"{v:.3f}"

    def label(c: int) -> str:
        if class_names and c < len(class_names) and class_names[c] != str(c):
            return f"{c} ({class_names[c]})"
        return str(c)

    rows = [[label(c)] + [cell(n, c) for n in names] for c in range(k)]
    return [("table", ["class"] + [f"{n} (per class)" for n in names], rows)]


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        if blk[0] == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif blk[0] == "p":
            out.append(blk[1])
        elif blk[0] == "list":
            out.append("\n".join(f"- {i}" for i in blk[1]))
        elif blk[0] == "img":
            out.append(f"![{blk[1]}]({blk[2]})")
        elif blk[0] == "table":
            head, rows = blk[1], blk[2]
            esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    import re

    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for blk in blocks:
        if blk[0] == "h":
            body.append(f"<h{blk[1]}>{_html.escape(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            body.append(f"<p>{_inline_html(blk[1])}</p>")
        elif blk[0] == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(str(i))}</li>" for i in blk[1]) + "</ul>")
        elif blk[0] == "img":
            body.append(f'<figure><img src="{_html.escape(blk[2])}" alt="{_html.escape(blk[1])}">'
                        f"<figcaption>{_html.escape(blk[1])}</figcaption></figure>")
        elif blk[0] == "table":
            head = "".join(f"<th>{_html.escape(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{_html.escape(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em;display:block;max-width:100%;overflow-x:auto}"
             "td,th{overflow-wrap:anywhere}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}code{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


_REQUIRED = {"run_id": str, "profile": dict, "data": dict, "baseline": dict, "attacks": list, "defenses": list,
             "risk": dict, "gate": dict, "environment": dict}


def load_results(path: Path) -> dict[str, Any]:
    """Read and check a results.json (the shape ``safedl run`` writes); DataError naming the file and the problem."""
    import json

    from safedl.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (give a run directory holding results.json, or the file itself)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(results, dict) or "schema_version" not in results:
        raise DataError(f"{path}: not a safedl results file (expected a JSON object with schema_version, run_id, "
                        "profile, data, baseline, attacks, defenses, risk, gate, environment)")
    if results["schema_version"] != 1:
        raise DataError(f"{path}: results schema_version {results['schema_version']!r} is not supported "
                        "(this safedl reads version 1)")
    bad = [f"{k} (expected a {t.__name__})" for k, t in _REQUIRED.items() if not isinstance(results.get(k), t)]
    if bad:
        raise DataError(f"{path}: missing or mis-typed key(s): {', '.join(bad)}")
    try:
        build_blocks(results, {})  # a dry render: any other mis-shaped value fails here, before anything is written
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: results file has an unexpected shape ({type(exc).__name__}: {exc}); "
                        "re-create it with `safedl run`") from None
    return results


def write_reports(results: dict[str, Any], run_dir: Path, *, html: bool = True, figures: bool = True) -> None:
    """Write report.md (and report.html) next to results.json, from the results alone."""
    run_dir = Path(run_dir)
    figs = {}
    if figures:
        from safedl.report.figures import summary_figures

        figs = summary_figures(results, run_dir)
        from safedl.report.tradeoff import tradeoff_figures

        figs.update(tradeoff_figures(results, run_dir))
        from safedl.report.extraction_figures import extraction_figures  # model-extraction curves (issue 13)

        figs.update(extraction_figures(results, run_dir))
        from safedl.report.eps_curve import eps_curve_figures  # robustness-vs-eps curves of eps sweeps (issue 30)

        figs.update(eps_curve_figures(results, run_dir))
    blocks = build_blocks(results, figs)
    atomic_write_text(RunDir(run_dir).report_md, to_markdown(blocks))
    if html:
        atomic_write_text(RunDir(run_dir).report_html, to_html(blocks, f"safedl report: {results['profile']['name']}"))
