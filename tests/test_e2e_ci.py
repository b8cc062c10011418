"""CI path end to end on tiny runs: the example workflow's commands, JUnit/gate.json, SLO, recommend + resume, compare."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"


def _sh(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               COLUMNS="400", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # tiny models: threads only contend
    env.update(extra)
    return env


def _cli(*args) -> "object":
    """In-process CLI call (no interpreter start-up) for the commands that are not the workflow's own."""
    from typer.testing import CliRunner

    from safedl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _workflow_commands() -> tuple[dict[str, str], list[str]]:
    wf = yaml.safe_load((CI / "github-actions.yml").read_text())
    job = wf["jobs"]["safedl"]
    return job["env"], [s["run"] for s in job["steps"] if str(s.get("run", "")).startswith("safedl ")]


@pytest.fixture(scope="module")
def ci(tmp_path_factory):
    """Run the GitHub workflow's safedl commands in a fresh folder holding examples/ci (the reference run is the
    first run itself, as the download-artifact step would provide it)."""
    tmp = tmp_path_factory.mktemp("ci")
    shutil.copytree(CI, tmp / "examples" / "ci")
    wf_env, commands = _workflow_commands()
    env = _env(wf_env)
    done = {}
    for cmd in commands:
        if cmd.startswith("safedl compare"):
            shutil.copytree(next((tmp / "runs").iterdir()), tmp / "reference-run")
        done[cmd.split()[1]] = _sh(cmd, tmp, env)
    return tmp, env, done, next((tmp / "runs").iterdir())


def test_the_example_workflow_runs_and_the_gate_reads_the_slo(ci):
    tmp, _, done, run_dir = ci
    assert [k for k in done] == ["validate", "run", "compare"]
    assert done["validate"].returncode == 0, done["validate"].stderr
    # the tiny undefended CNN cannot meet the SLO's attack_success_rate <= 0.95: the gate fails with exit 1
    assert done["run"].returncode == 1, done["run"].stderr
    assert done["compare"].returncode == 0 and "no significant change" in done["compare"].stdout
    gate = yaml.safe_load((run_dir / "profile.yaml").read_text())["evaluation"]["gate"]
    assert gate["max_attack_success_rate"] == 0.95 and gate["min_clean_accuracy"] == 0.5  # from slo.yaml
    g = json.loads((run_dir / "gate.json").read_text())
    assert g["passed"] is False and any("pgd" in f for f in g["failures"])


def test_junit_parses_and_names_every_check(ci):
    junitparser = pytest.importorskip("junitparser")
    tmp, _, _, run_dir = ci
    results = json.loads((run_dir / "results.json").read_text())
    from safedl.report.junit import gate_checks

    checks = gate_checks(results["gate"])
    xml = junitparser.JUnitXml.fromfile(str(tmp / "safedl-junit.xml"))
    cases = [case for suite in xml for case in suite]
    assert [c.name for c in cases] == [c["name"] for c in checks] and cases
    failed = [c for c in cases if not c.is_passed]
    assert len(failed) == sum(not c["passed"] for c in checks) >= 1
    assert all(r.message for c in failed for r in c.result)
    root = ET.parse(tmp / "safedl-junit.xml").getroot()  # the schema's shape: testsuites > testsuite > testcase
    assert root.tag == "testsuites" and root[0].tag == "testsuite" and int(root[0].get("tests")) == len(checks)


def test_junit_writer_reports_value_threshold_and_interval():
    from safedl.report.junit import junit_xml
    from safedl.utils.stats import proportion

    results = {"profile": {"name": "p"}, "run_id": "r", "baseline": {"metrics": {"clean_accuracy": proportion(90, 100)}},
               "attacks": [{"id": "pgd", "metrics": {"robust_accuracy": proportion(30, 120)}}], "defenses": [],
               "gate": {"passed": False, "configured": True, "compared": "lower", "failures": ["x"], "checks": [
                   {"name": "min_clean_accuracy: baseline", "metric": "baseline.clean_accuracy", "op": ">=",
                    "threshold": 0.8, "value": 0.83, "bound": "lower95", "passed": True, "reason": "ok"},
                   {"name": "min_robust_accuracy: pgd", "metric": "pgd.robust_accuracy", "op": ">=", "threshold": 0.5,
                    "value": 0.18, "bound": "lower95", "passed": False, "reason": "pgd.robust_accuracy < 0.5"}]}}
    root = ET.fromstring(junit_xml(results).split("\n", 1)[1])
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == ["min_clean_accuracy: baseline", "min_robust_accuracy: pgd"]
    assert cases[0].find("failure") is None and cases[1].get("classname") == "safedl.gate.min_robust_accuracy"
    text = cases[1].find("failure").text
    ci = proportion(30, 120)["ci95"]
    assert "threshold 0.5" in text and "0.18" in text and f"{ci[0]}" in text and "n=120" in text


def test_gitlab_example_runs_the_same_commands():
    _, github = _workflow_commands()
    gitlab = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["robustness"]["script"]
    found = [re.search(r"(safedl [^;]+?)(;|$)", s).group(1).strip() for s in gitlab if "safedl " in s]
    assert found == github


def test_recommend_names_a_measured_defense_and_its_profile_resumes_every_stage(ci):
    tmp, env, _, run_dir = ci
    rec = json.loads((run_dir / "recommendations.json").read_text())  # written by run --recommend
    pgd = next(r for r in rec["attacks"] if r["attack"] == "pgd")
    results = json.loads((run_dir / "results.json").read_text())
    fat = next(d for d in results["defenses"] if d["id"] == "fast_adversarial_training" and d["against"] == "pgd")
    # the documented rule, recomputed from results.json: the 95% intervals of 1 - robust_accuracy are separate
    measured_helps = 1 - fat["metrics"]["robust_accuracy"]["ci95"][0] < 1 - results["attacks"][1]["metrics"][
        "robust_accuracy"]["ci95"][1]
    assert pgd["succeeded"] and pgd["candidates"][0]["evidence"] == "measured"
    assert (pgd["recommended"] is not None) == measured_helps
    if measured_helps:
        assert pgd["recommended"]["defense"] == "fast_adversarial_training" and "measured in this run" in pgd[
            "recommended"]["why"]
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "stages").rglob("stage.json")}
    assert _cli("recommend", run_dir).exit_code == 0
    res = _sh(f"safedl run {run_dir}/recommended.yaml --resume {run_dir} --no-progress", tmp, env)
    again = json.loads((run_dir / "results.json").read_text())
    assert res.returncode == (0 if again["gate"]["passed"] else 1), res.stderr  # exit 1 only for a failed gate
    # baseline, 2 attacks, 1 defense against each: every stage reused, none rewritten
    assert " ".join(res.stderr.split()).count("reusing finished stage") == len(stamps) == 5
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["attacks"] == results["attacks"] and again["defenses"] == results["defenses"]


def test_compare_seeds_adversarial_training_and_regression_gate(ci):
    tmp, env, _, run_a = ci
    prof = yaml.safe_load((CI / "profile.yaml").read_text())
    seed1 = dict(prof, seed=1)
    (tmp / "seed1.yaml").write_text(yaml.safe_dump(seed1))
    ckpt = next((run_a / "stages").rglob("defense-models/*/model.pt"))
    robust = dict(prof, model={"arch": "tiny_cnn", "checkpoint": str(ckpt)}, defenses=[])
    (tmp / "robust.yaml").write_text(yaml.safe_dump(robust))
    for name in ("seed1", "robust"):
        res = _cli("run", tmp / f"{name}.yaml", "--runs-dir", tmp / f"runs-{name}", "--no-progress", "-q")
        gate = json.loads((next((tmp / f"runs-{name}").iterdir()) / "results.json").read_text())["gate"]
        assert res.exit_code == (0 if gate["passed"] or not gate.get("configured", True) else 1), res.output
    s1, rb = next((tmp / "runs-seed1").iterdir()), next((tmp / "runs-robust").iterdir())
    res = _cli("compare", run_a, s1, "--out", tmp / "cmp-seeds", "--fail-on-regression")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp / "cmp-seeds" / "comparison.json").read_text())["comparisons"][0]["rows"]
    assert rows and all(r["verdict"] == "no significant change" for r in rows), rows
    assert any(r["test"].startswith("McNemar") for r in rows)  # split_seed fixed: paired on the same images
    _cli("compare", run_a, rb, "--out", tmp / "cmp-at")
    rows = {r["metric"]: r for r in json.loads((tmp / "cmp-at" / "comparison.json").read_text())["comparisons"][0]["rows"]}
    assert rows["pgd.robust_accuracy"]["verdict"] == "better" and rows["pgd.robust_accuracy"]["test"].startswith("McNemar")
    res = _cli("compare", rb, run_a, s1, "--out", tmp / "cmp-swapped", "--fail-on-regression")
    assert res.exit_code == 1 and "pgd.robust_accuracy" in res.output
    assert (tmp / "cmp-swapped" / "trend.png").is_file() and "<img" in (tmp / "cmp-swapped" / "comparison.html").read_text()
