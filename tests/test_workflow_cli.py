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
