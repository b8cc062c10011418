"""``safedl retrain RUN_DIR --add reviewed.npz``: mounted by safedl.cli (the work is in safedl.run.retrain)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def retrain_command(
        run_dir: Path = typer.Argument(..., help="the finished run the served bundle was exported from"),
        add: list[Path] = typer.Option(..., "--add", help="an .npz of labelled images to add to the training "
                                                         "split (`safedl review export`); repeatable"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="where the new run goes (default: next "
                                                                          "to RUN_DIR)")) -> None:
    """Rerun RUN_DIR's profile with the reviewed data added (dataset.extra) as a new run, compare it with RUN_DIR
    on the same test images (paired tests) and apply its release gate: exit 0 when its model may replace the
    served one (then `safedl export NEW_RUN ...`), 1 when not (reasons printed and in NEW_RUN/retrain.json)."""
    from safedl.run.retrain import retrain

    from safedl.utils.tensors import resolve_device

    new_dir, doc = retrain(run_dir, added=add, device=str(resolve_device(device)), runs_dir=runs_dir)
    typer.echo(f"new run: {new_dir} (training images {doc['train_size']['before']} -> {doc['train_size']['after']})")
    typer.echo(f"comparison: {doc['comparison'].get('markdown')}")
    if doc["replace"]:
        typer.echo("decision: REPLACE (gate passed, no significant regression); export it with "
                   f"`safedl export {new_dir} --out BUNDLE ...`")
        raise typer.Exit(0)
    typer.echo("decision: KEEP the served model")
    for r in doc["reasons"]:
        typer.echo(f"  - {r}")
    raise typer.Exit(1)
