"""Safe-DL workflow commands on one tiny run (issue 30): ``safedl export-results --layout safe-dl`` and
``safedl defend``."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app

PROFILE = tiny_profile(
    name="tiny-workflow", training={"epochs": 8},
    attacks={"backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                             "poison_fraction": 0.1}}]},
    defenses=[{"name": "spectral_signatures", "against": ["static_patch"]}],
    trusted_clean_set={"source": "validation", "size": 100},
    evaluation={"n_examples": 8},
    output={"dir": "runs", "figures": False, "html": False},
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wf")
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    return next((tmp / "runs").iterdir())


def test_export_results_writes_the_safe_dl_layout(run_dir, tmp_path):
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export-results", str(run_dir), "--layout", "safe-dl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    folder = out / "results" / "backdoor" / "static_patch"
    rec = json.loads((folder / "spectral_signatures_results.json").read_text())
    entry = next(d for d in json.loads((run_dir / "results.json").read_text())["defenses"])
    removed = json.loads((folder / "spectral_signatures_removed_indices.json").read_text())["indices"]
    assert removed == entry["removed_indices"] and rec["removed_count"] == len(removed)
    assert len(removed) == round(entry["metrics"]["flagged"]["value"])
    pngs = sorted((folder / "spectral_signatures_examples").glob("*.png"))
    assert len(pngs) == 5 and rec["examples"] == [f"spectral_signatures_examples/{p.name}" for p in pngs]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert set(e["index"] for e in entry["examples"]) <= set(removed)
    md = (folder / "spectral_signatures_report.md").read_text()
    assert "# spectral_signatures vs static_patch (backdoor)" in md and "detection.tpr" in md
    assert f"Removed {len(removed)} training samples" in md
    # a non-empty --out is refused (nothing replaced); an unknown layout names the allowed ones
    res = CliRunner().invoke(app, ["export-results", str(run_dir), "--out", str(out)])
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    res = CliRunner().invoke(app, ["export-results", str(run_dir), "--layout", "art", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "layouts are: safe-dl" in res.output and not (tmp_path / "x").exists()


def test_defend_headless_accept_all_pick_and_set(run_dir, tmp_path):
    from safedl.profile import load_profile
    from safedl.workflow.defend import choices

    results = json.loads((run_dir / "results.json").read_text())
    opts = next(c for c in choices(results) if c.attack == "static_patch").options
    assert "fine_pruning" in [o.name for o in opts]  # a prior for static_patch (decide/priors.yaml)
    out = tmp_path / "all.yaml"
    res = CliRunner().invoke(app, ["defend", str(run_dir), "--accept-all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    assert [(d.name, d.against) for d in prof.defenses] == [(opts[0].name, ["static_patch"])]
    assert prof.defenses[0].params == opts[0].params
    out = tmp_path / "fp.yaml"
    res = CliRunner().invoke(app, ["defend", str(run_dir), "--pick", "static_patch=fine_pruning",
                                   "--set", "fine_pruning.epochs=3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (d,) = load_profile(out).defenses
    assert d.name == "fine_pruning" and d.params["epochs"] == 3 and d.params["max_accuracy_drop"] == 0.04
    # bad input: one clear error, exit 2, nothing written
    for args, msg in ((["--set", "fine_pruning.no_such=1"], "fine_pruning has no parameter no_such"),
                      (["--set", "fine_pruning.epochs=-1"], "do not make a valid profile, nothing written"),
                      (["--set", "neural_cleanse.epochs"], "expected DEFENSE.PARAM=VALUE"),
                      (["--set", "lid.k=3"], "--set names lid, which was not chosen")):
        bad = tmp_path / "bad.yaml"
        res = CliRunner().invoke(app, ["defend", str(run_dir), "--pick", "static_patch=fine_pruning", *args,
                                       "--out", str(bad)])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert not bad.exists()


def test_defend_interactive_through_a_pseudo_terminal(run_dir, tmp_path):
    import os
    import sys
    from pathlib import Path

    from safedl.profile import load_profile

    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "asked.yaml"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), COLUMNS="200", TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "safedl.cli", "defend", str(run_dir), "--out", str(out)], env=env,
                          encoding="utf-8", timeout=120)
    child.expect(r"Defense for static_patch \(number, 0 = none\)")
    child.sendline("fine_pruning")
    child.expect(r"Accept these parameters for fine_pruning\?")
    child.sendline("n")
    for name, reply in (("max_accuracy_drop", "0.1"), ("step", ""), ("max_ratio", ""), ("epochs", "2"), ("lr", ""),
                        ("batch_size", "")):
        child.expect(rf"{name} \[")
        child.sendline(reply)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    (d,) = load_profile(out).defenses
    assert (d.name, d.against, d.params["max_accuracy_drop"], d.params["epochs"], d.params["step"]) == (
        "fine_pruning", ["static_patch"], 0.1, 2, 1)
