"""What ``safedl retrain`` prints and its exit code (the command's options are in safedl.cli; the work is in
safedl.run.retrain)."""
from __future__ import annotations

from pathlib import Path

import typer

from safedl.run.retrain import retrain


def retrain_and_report(run_dir: Path, *, added: list[Path], device: str, runs_dir: Path | None) -> int:
    """Run the retraining and say what it decided: 0 when the new run's model may replace the served one."""
    new_dir, doc = retrain(run_dir, added=added, device=device, runs_dir=runs_dir)
    typer.echo(f"new run: {new_dir} (training images {doc['train_size']['before']} -> {doc['train_size']['after']})")
    typer.echo(f"comparison: {doc['comparison'].get('markdown')}")
    if doc["replace"]:
        typer.echo("decision: REPLACE (gate passed, no significant regression); export it with "
                   f"`safedl export {new_dir} --out BUNDLE ...`")
        return 0
    typer.echo("decision: KEEP the served model")
    for r in doc["reasons"]:
        typer.echo(f"  - {r}")
    return 1
