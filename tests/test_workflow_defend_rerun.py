"""The profile ``safedl defend RUN_DIR --accept-all`` writes is a profile ``safedl run`` runs: exit 0, and every
chosen defense is measured against the attacks it was picked for (evasion and backdoor)."""
from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from _profiles import tiny_profile
from safedl.cli import app

PROFILE = tiny_profile(
    name="tiny-defend-rerun", training={"epochs": 8},
    attacks={"evasion": [{"name": "pgd", "params": {"eps": 0.1, "steps": 5}}],
             "backdoor": [{"name": "static_patch", "params": {"target_class": 3, "patch_size": 2,
                                                             "poison_fraction": 0.1}}]},
    defenses=[{"name": "spectral_signatures", "against": ["static_patch"]},
              {"name": "spatial_smoothing", "against": ["pgd"]}],
    trusted_clean_set={"source": "validation", "size": 100},
    evaluation={"n_eval": 40, "n_examples": 0, "strong_adaptive": {"enabled": False}},
    output={"dir": "runs", "figures": False, "html": False},
)


def test_defended_profile_runs_end_to_end(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(runs), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    run_dir = next(runs.iterdir())
    out = tmp_path / "defended.yaml"
    res = CliRunner().invoke(app, ["defend", str(run_dir), "--accept-all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    chosen = yaml.safe_load(out.read_text())["defenses"]
    assert chosen, out.read_text()
    res = CliRunner().invoke(app, ["run", str(out), "--runs-dir", str(tmp_path / "runs2"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((next((tmp_path / "runs2").iterdir()) / "results.json").read_text())
    got = {(d["id"], d["against"]) for d in r["defenses"]}
    want = {(c.get("id", c["name"]), a) for c in chosen for a in c["against"]}
    assert want <= got, (want, got)
