"""``run_profile(tmp_path, profile)``: one ``safedl run`` of a profile dict through the CLI, for the tests that read
its results. The exit code must be the gate's (0 passed or not configured, 1 failed), never merely 'not an error'."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from safedl.cli import app


def run_profile(tmp_path: Path, profile: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Run ``profile`` into ``tmp_path/runs``; return the run directory and its results, checking the exit code
    against the gate."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    res = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q"])
    assert (tmp_path / "runs").is_dir(), res.output
    run_dir = next((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert res.exit_code == (0 if results["gate"]["passed"] else 1), res.output
    return run_dir, results
