"""CI artifacts of a run: a JUnit XML file (one testcase per release-gate check) and a compact gate.json.

The gate result is ``results["gate"]`` (``safedl.decide.gate``): ``checks`` is a list of
``{"name", "metric", "op", "threshold", "value", "bound", "passed", "reason"}``. Results written before the gate
listed its checks (only ``failures``) still give a valid file: one testcase per failure, or one passing testcase.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from safedl.utils.io import atomic_write_json, atomic_write_text
from safedl.rundir import RunDir


def gate_checks(gate: dict[str, Any]) -> list[dict[str, Any]]:
    """The gate's checks; for older results, one pseudo-check per failure (or one passing 'release gate')."""
    if gate.get("checks") is not None:
        return list(gate["checks"])
    if gate.get("failures"):
        return [{"name": f, "metric": "", "op": "", "threshold": None, "value": None, "bound": "", "passed": False,
                 "reason": f} for f in gate["failures"]]
    return [{"name": "release gate", "metric": "", "op": "", "threshold": None, "value": None, "bound": "",
             "passed": True, "reason": "no failures"}]


def _subject_metrics(results: dict[str, Any], label: str) -> dict[str, Any] | None:
    if label == "baseline":
        return results.get("baseline", {}).get("metrics")
    for a in results.get("attacks", []):
        if a.get("id") == label:
            return a.get("metrics")
    for d in results.get("defenses", []):
        if f"{d.get('id')} vs {d.get('against')}" == label:
            return d.get("metrics")
    return None


def metric_interval(results: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The metric dict ({value, ci95, n}) a check names as ``subject.path``, or None."""
    for label in sorted({"baseline", *(a.get("id") for a in results.get("attacks", [])),
                         *(f"{d.get('id')} vs {d.get('against')}" for d in results.get("defenses", []))},
                        key=len, reverse=True):
        if label and metric.startswith(f"{label}."):
            cur: Any = _subject_metrics(results, label)
            for part in metric[len(label) + 1:].split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            return cur if isinstance(cur, dict) and "value" in cur else None
    return None


def _detail(check: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [check.get("reason", "")]
    if check.get("threshold") is not None:
        lines.append(f"metric: {check['metric']}  measured: {check.get('value')}  compared ({check.get('bound')}) "
                     f"{check.get('op')} threshold {check['threshold']}")
    m = metric_interval(results, check.get("metric") or "")
    if m is not None:
        lines.append(f"point value {m.get('value')}, 95% interval {m.get('ci95')}, n={m.get('n')}")
    return "\n".join(lines)


def junit_xml(results: dict[str, Any]) -> str:
    """A JUnit XML document: one <testsuite> named after the profile, one <testcase> per gate check."""
    gate = results.get("gate", {})
    checks = gate_checks(gate)
    failures = sum(not c["passed"] for c in checks)
    name = f"safedl release gate: {results.get('profile', {}).get('name', '')}"
    suites = ET.Element("testsuites", name="safedl", tests=str(len(checks)), failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(checks)), failures=str(failures),
                          errors="0", skipped="0", timestamp=str(results.get("created", "")))
    props = ET.SubElement(suite, "properties")
    for key, value in (("run_id", results.get("run_id")), ("configured", gate.get("configured", True)),
                       ("compared", gate.get("compared")),
                       ("overall_risk", results.get("risk", {}).get("overall_level")),
                       ("residual_risk", results.get("risk", {}).get("residual_level"))):
        ET.SubElement(props, "property", name=key, value=str(value))
    for c in checks:
        group = c["name"].split(":")[0].strip().replace(" ", "_") if gate.get("checks") is not None else ""
        case = ET.SubElement(suite, "testcase", name=c["name"], time="0",
                             classname="safedl.gate" + (f".{group}" if group else ""))
        if not c["passed"]:
            fail = ET.SubElement(case, "failure", message=c.get("reason", ""), type="GateCheckFailed")
            fail.text = _detail(c, results)
        else:
            ET.SubElement(case, "system-out").text = _detail(c, results)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def gate_json(results: dict[str, Any]) -> dict[str, Any]:
    """The compact gate record for CI: verdict, every check, and the risk levels."""
    gate = results.get("gate", {})
    risk = results.get("risk", {})
    return {"run_id": results.get("run_id"), "profile": results.get("profile", {}).get("name"),
            "passed": bool(gate.get("passed")), "configured": gate.get("configured", True),
            "compared": gate.get("compared"), "checks": gate_checks(gate), "failures": gate.get("failures", []),
            "risk": {"overall": risk.get("overall_level"), "residual": risk.get("residual_level")}}


def write_ci_artifacts(results: dict[str, Any], run_dir: Path, *, junit: Path | None = None) -> None:
    """RUN_DIR/gate.json always; the JUnit file where asked."""
    atomic_write_json(RunDir(run_dir).gate, gate_json(results))
    if junit is not None:
        atomic_write_text(junit, junit_xml(results))
