"""``safedl gameday``: start a local deployment per scenario, run the scripted faults and attacks, and report (Markdown
and JSON) which alerts fired and how long each took against its target."""
from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError
from safedl.redteam.cli import ensure_logging
from safedl.redteam.gameday.report import summary, write_report
from safedl.redteam.gameday.run import Context, run_scenario
from safedl.redteam.gameday.scenarios import SCENARIOS

log = logging.getLogger("safedl.redteam.gameday")
DEFAULT = "corrupt_bundle,keyless_flood,extraction_run,drifted_stream,kill_worker"
# without calibration: the test suite's thresholds (tests/test_deploy_monitoring.py monitor_settings)
FIXED = {"stateful": {"threshold": 1.0}, "prada": {"delta": 0.9}, "copycat": {"enabled": False},
         "sybil": {"enabled": False}}


def parse_scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise UserError(f"--scenarios {text!r}: unknown {bad or 'empty list'}; allowed: {', '.join(SCENARIOS)}")
    return names


def _images(bundle: Path):
    """Test and training images of the bundle's built-in data set (split 70/10/20, seed 0)."""
    import json

    from safedl.data.builtin import load_builtin
    from safedl.data.split import stratified_split

    name = json.loads((bundle / "manifest.json").read_text())["data"]["name"]
    try:
        splits = stratified_split(load_builtin(name), test_fraction=0.2, val_fraction=0.1, seed=0)
    except (KeyError, ValueError) as exc:
        raise UserError(f"--bundle {bundle}: the game day draws its probes from the bundle's built-in data set; "
                        f"{name!r} is not one ({exc})") from None
    return splits.test.x, splits.train.x


def _calibrate(bundle: Path, out: Path, timeout_s: float) -> Path:
    cmd = [sys.executable, "-m", "safedl.cli", "monitor", "calibrate", str(bundle), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise UserError(f"safedl monitor calibrate {bundle}: exit {r.returncode}: {r.stderr[-800:]}")
    return out


def gameday_command(
        out_dir: Path = typer.Option(..., "--out-dir", help="folder for gameday.md, gameday.json and the runs"),
        bundle: Optional[Path] = typer.Option(None, "--bundle", help="bundle to deploy (default: the tiny digits "
                                              "bundle, trained and exported into OUT_DIR/bundle, seed 0)"),
        scenarios: str = typer.Option(DEFAULT, "--scenarios", help=f"comma-separated: {DEFAULT}"),
        budget_s: float = typer.Option(900.0, "--budget-s", min=10.0, help="wall-time bound of the whole game day"),
        calibration: Optional[Path] = typer.Option(None, "--calibration", help="`safedl monitor calibrate` output "
                                                   "(default: calibrate the bundle first)"),
        fixed_thresholds: bool = typer.Option(False, "--fixed-thresholds", help="skip calibration: stateful "
                                              "threshold 1.0, PRADA delta 0.9, copycat and sybil off")) -> None:
    """Run game-day scenarios against local deployments on 127.0.0.1; exit 1 when an expected alert did not fire
    within its target."""
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    ensure_logging()
    names = parse_scenarios(scenarios)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        from safedl.redteam.gameday.tiny_bundle import build_tiny_bundle

        bundle = out_dir / "bundle"
        if not (bundle / "manifest.json").is_file():
            build_tiny_bundle(bundle)
    elif not (bundle / "manifest.json").is_file():
        raise UserError(f"--bundle {bundle}: not a bundle directory (no manifest.json)")
    if calibration is not None and not calibration.is_file():
        raise UserError(f"--calibration {calibration}: not found")
    x_test, x_train = _images(bundle)
    if calibration is None and not fixed_thresholds:
        calibration = _calibrate(bundle, out_dir / "calibration.json", timeout_s=budget_s)
    monitor = {"calibration": None if fixed_thresholds else calibration.resolve(),
               "thresholds": FIXED if fixed_thresholds else None}
    ctx = Context(x_test=x_test, x_seed=x_train[:50], deadline=t0 + budget_s)
    results = []
    for name in names:
        if time.monotonic() >= ctx.deadline:
            log.warning("--budget-s reached: %s and later scenarios not run", name)
            break
        log.info("scenario %s", name)
        results.append(run_scenario(SCENARIOS[name], bundle=bundle, workdir=out_dir / "runs" / name,
                                    monitor=monitor, ctx=ctx))
    meta = {"command": "safedl gameday " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "safedl gameday",
            "bundle": str(bundle), "started": started.isoformat(timespec="seconds"),
            "seconds": time.monotonic() - t0, "scenarios_requested": names}
    md, js = write_report(out_dir, results, meta)
    s = summary(results)
    log.info("%d of %d expected alerts fired, %d within target; report: %s, %s", s["fired"], s["expected"],
             s["within_target"], md, js)
    raise typer.Exit(0 if s["within_target"] == s["expected"] and len(results) == len(names) else 1)
