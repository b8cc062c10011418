"""The executive summary on top of the report: verdict, the three largest risks with their numbers, the first
three actions of `safedl recommend`, and the shortcuts the run took (model cache, early stopping)."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from safedl.cli import app
from safedl.decide.recommend import recommend
from safedl.report.executive_summary import first_actions, shortcuts, top_risks
from _profiles import tiny_profile

PROFILE = tiny_profile(
    attacks={"evasion": [{"name": "fgsm", "params": {"eps": 0.3}},
                         {"name": "pgd", "params": {"eps": 0.3, "steps": 5}}],
             "poisoning": [{"name": "label_flipping", "params": {"flip_rate": 0.3}}]},
    defenses=[{"name": "feature_squeezing", "params": {"bit_depth": 1}, "against": ["pgd"]}],
    evaluation={"strong_adaptive": {"steps": 10, "restarts": 1}, "gate": {"min_clean_accuracy": 0.5}},
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny profile run twice with the model cache on (the second run reuses its models)."""
    tmp = tmp_path_factory.mktemp("summary")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAFEDL_MODEL_CACHE", "on")
    mp.setenv("SAFEDL_CACHE_DIR", str(tmp / "cache"))
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    out = []
    try:
        for k in range(2):
            res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / f"r{k}"), "--no-progress", "-q"])
            run_dir = next((tmp / f"r{k}").iterdir())
            results = json.loads((run_dir / "results.json").read_text())
            assert res.exit_code == (0 if results["gate"]["passed"] else 1), res.output  # the gate sets the code
            out.append((results, (run_dir / "report.md").read_text()))
    finally:
        mp.undo()
    return out


def _section(md: str) -> str:
    return md.split("## Executive summary", 1)[1].split("\n## ", 1)[0]


def test_summary_is_on_top_with_verdict(two_runs):
    results, md = two_runs[0]
    assert md.index("## Executive summary") < md.index("## Baseline")
    sec = _section(md)
    assert f"Overall risk **{results['risk']['overall_level']}**" in sec
    assert ("PASSED" if results["gate"]["passed"] else "FAILED") in sec


def test_summary_lists_the_three_largest_risks_with_numbers(two_runs):
    results, md = two_runs[0]
    sec = _section(md)
    rows = results["risk"]["per_attack"]
    want = sorted(rows, key=lambda r: (r.get("residual_score", r["score"]), r["score"]), reverse=True)[:3]
    assert [r["attack"] for r in top_risks(results)] == [r["attack"] for r in want]
    lines = [ln for ln in sec.splitlines() if ln.startswith("- ") and "risk (score" in ln]
    assert len(lines) == 3
    for line, r in zip(lines, want):
        assert line.startswith(f"- {r['attack']} ")
        assert f"score {r['score']:.2f}" in line and r["driver"] in line


def test_summary_actions_come_from_recommend(two_runs):
    results, md = two_runs[0]
    recommended = {row["attack"]: row["recommended"]["defense"] for row in recommend(results)["attacks"]
                   if row["recommended"]}
    actions = first_actions(results)
    assert len(actions) == min(3, len(recommended)) and actions
    for a in actions:
        assert any(f"**{d}** against {att} " in a for att, d in recommended.items())
        assert a in _section(md)


def test_summary_states_the_shortcuts(two_runs):
    (first, md1), (second, md2) = two_runs
    cuts1, cuts2 = shortcuts(first), shortcuts(second)
    assert not any("model cache" in c for c in cuts1)  # the first run trained everything
    assert any("early stopping" in c and "feature_squeezing" in c for c in cuts1)
    cache_line = next(c for c in cuts2 if "model cache" in c)
    assert cache_line.startswith("2 trained model(s)")  # the baseline and the poisoned model; nothing else trains
    assert "baseline" in cache_line and cache_line in md2


def test_a_process_pool_with_its_default_size_is_named_as_parallel_stages(monkeypatch):
    """The default profile leaves ``execution.workers`` unset: results must record the size the pool really had
    (it recorded None, and the summary then left the parallel stages out)."""
    from safedl import registry

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    ex = registry.create("executor", "process")
    assert ex.resolved() == (2, 1)
    results = {"execution": dict(zip(("executor", "workers", "threads_per_task"), ("process", *ex.resolved()))),
               "attacks": [], "defenses": []}
    assert any("2 at a time" in s for s in shortcuts(results))
    assert registry.create("executor", "serial").resolved() == (None, None)
