"""`safedl gameday`: a reduced game day (corrupt bundle, keyless flood, drifted stream) against local deployments it
starts itself on 127.0.0.1 fires the expected alerts within their targets and writes the Markdown and JSON report;
bad input is exit 2 before anything starts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from typer.testing import CliRunner  # noqa: E402

from _serve_helpers import make_bundle  # noqa: E402
from safedl.cli import app as cli_app  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def child_env(monkeypatch):
    """The deployments are `python -m safedl.cli serve` children: they import this checkout."""
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_reduced_game_day_fires_the_expected_alerts_within_their_targets(tiny_model, digits_splits, tmp_path,
                                                                         child_env):
    bundle = make_bundle(tiny_model, digits_splits, tmp_path / "bundle", drift=True)
    out = tmp_path / "gd"
    res = CliRunner().invoke(cli_app, ["gameday", "--bundle", str(bundle), "--out-dir", str(out), "--scenarios",
                                       "corrupt_bundle,keyless_flood,drifted_stream", "--fixed-thresholds",
                                       "--budget-s", "500"])
    doc = json.loads((out / "gameday.json").read_text())
    assert res.exit_code == 0, (res.output, json.dumps(doc["scenarios"], indent=1)[:3000])
    by = {s["name"]: s for s in doc["scenarios"]}
    assert list(by) == ["corrupt_bundle", "keyless_flood", "drifted_stream"]
    fired = {(s["name"], a["alert"]): a for s in doc["scenarios"] for a in s["alerts"]}
    for key in (("corrupt_bundle", "SafedlBundleSwapFailed"), ("keyless_flood", "pre-auth limiter answers 429"),
                ("drifted_stream", "monitor:input_drift"), ("drifted_stream", "SafedlInputDrift")):
        a = fired[key]
        assert a["fired"] and a["met"] and 0 <= a["after_s"] <= a["target_s"], key
    swap = by["corrupt_bundle"]["action"]
    assert 400 <= swap["swap_status"] < 500 and swap["still_serving_old_bundle"] and swap["ready"]
    assert by["keyless_flood"]["action"]["status_counts"].get("429", 0) > 0
    assert doc["summary"] == {"expected": 5, "fired": 5, "within_target": 5, "scenarios_failed": []}
    md = (out / "gameday.md").read_text()
    assert "| SafedlBundleSwapFailed | prometheus | yes |" in md and "## drifted_stream" in md


@pytest.mark.parametrize("args,message", [
    (["--scenarios", "corrupt_bundle,meteor"], "allowed: corrupt_bundle"),
    (["--bundle", "NOWHERE"], "not a bundle directory"),
])
def test_bad_input_is_exit_2_before_any_deployment_starts(tmp_path, args, message):
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    res = CliRunner().invoke(cli_app, ["gameday", "--out-dir", str(tmp_path / "gd"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "gd" / "runs").exists() and not (tmp_path / "gd" / "bundle").exists()
