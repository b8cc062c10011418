"""The workflow commands: ``safedl defend RUN_DIR`` and ``safedl export-results RUN_DIR``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

log = logging.getLogger(__name__)


def _results(run_dir: Path) -> dict:
    from safedl.report.render import load_results
    from safedl.rundir import RunDir

    return load_results(RunDir(run_dir).results if run_dir.is_dir() else run_dir)


def export_results_command(
        run_dir: Path = typer.Argument(..., help="a finished run directory (holding results.json)"),
        layout: str = typer.Option("safe-dl", "--layout", help="the folder layout to write: safe-dl"),
        out: Path = typer.Option(..., "--out", help="folder to write (new or empty)"),
        force: bool = typer.Option(False, "--force", help="replace a non-empty --out")) -> None:
    """Write per-defense results: results/<category>/<attack>/<defense>_results.json, _report.md, removed indices
    and up to 5 example images per defense."""
    from safedl.report.safe_dl_layout import LAYOUTS, export_safe_dl

    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: layouts are: {', '.join(LAYOUTS)}")
    results = _results(run_dir)
    files = export_safe_dl(results, run_dir if run_dir.is_dir() else run_dir.parent, out, force=force)
    n_def = sum(1 for f in files if f.name.endswith("_results.json"))
    typer.echo(f"wrote {len(files)} files for {n_def} defense result(s) under {out / 'results'}")


def _ask_params(opt, sets: dict):
    """Interactive: accept the parameters, or type a new value for each (Enter keeps it; values read as YAML)."""
    import yaml

    from safedl.workflow.defend import customise

    opt = customise(opt, sets)
    for k, v in opt.params.items():
        typer.echo(f"    {k} = {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    if typer.confirm(f"  Accept these parameters for {opt.name}?", default=True):
        return opt
    updates = {}
    for k, v in opt.params.items():
        shown = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
        raw = typer.prompt(f"    {k}", default=shown)
        if raw != shown:
            try:
                updates[k] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise UserError(f"{opt.name}.{k}: {raw!r} is not valid YAML ({exc})") from None
    return customise(opt, updates)


def _pick_one(choice, picked: Optional[str], interactive: bool):
    """The chosen Option of one attack (None: no defense); --pick takes a number (1 = recommended) or a name."""
    if interactive:
        raw = typer.prompt(f"  Defense for {choice.attack} (number, 0 = none)", default="1")
    else:
        raw = picked or "1"
    if raw.isdigit() and int(raw) <= len(choice.options):
        return choice.options[int(raw) - 1] if int(raw) else None
    named = [o for o in choice.options if o.name == raw]
    if not named:
        raise UserError(f"{choice.attack}: {raw!r} is not one of the choices 0..{len(choice.options)} or "
                        f"{', '.join(o.name for o in choice.options)}")
    return named[0]


def defend_command(
        run_dir: Path = typer.Argument(..., help="a finished run directory (holding results.json)"),
        accept_all: bool = typer.Option(False, "--accept-all", help="headless: the recommended defense of every "
                                        "attack with its parameters (plus --set, --pick)"),
        pick: list[str] = typer.Option([], "--pick", help="ATTACK=N or ATTACK=DEFENSE (N: 1 = recommended, 0 = none)"),
        set_: list[str] = typer.Option([], "--set", help="DEFENSE.PARAM=VALUE (VALUE read as YAML)"),
        out: Optional[Path] = typer.Option(None, "--out", help="profile to write (default RUN_DIR/defended.yaml)")) -> None:
    """Choose, per attack, among the defenses the evidence recommends, accept or customise their parameters, and
    write them into a new profile (validated; written whole or not at all)."""
    from safedl.rundir import RunDir
    from safedl.workflow.defend import apply, choices, customise, parse_set, write_profile

    results = _results(run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    sets, picks_by = parse_set(set_), {}
    for item in pick:
        attack, sep, what = item.partition("=")
        if not sep or not attack or not what:
            raise UserError(f"--pick {item!r}: expected ATTACK=N or ATTACK=DEFENSE")
        picks_by[attack] = what
    interactive = not accept_all and not pick
    table = choices(results)
    unknown = sorted(set(picks_by) - {c.attack for c in table})
    if unknown:
        raise UserError(f"--pick: no succeeded attack {', '.join(unknown)}; attacks to defend: "
                        f"{', '.join(c.attack for c in table) or '(none)'}")
    picks, used = [], set()
    for c in table:
        typer.echo(f"{c.attack} ({c.category}): {c.summary}")
        if not c.options:
            typer.echo("  no defense is shown to help against it (see recommendations.md); skipped")
            continue
        for i, o in enumerate(c.options, 1):
            typer.echo(f"  {i}. {o.name} ({o.evidence}{', recommended' if i == 1 else ''}): {o.why}")
        opt = _pick_one(c, picks_by.get(c.attack), interactive)
        if opt is None:
            continue
        used.add(opt.name)
        opt = _ask_params(opt, sets.get(opt.name, {})) if interactive else customise(opt, sets.get(opt.name, {}))
        picks.append((c.attack, opt))
    stray = sorted(set(sets) - used)
    if stray:
        raise UserError(f"--set names {', '.join(stray)}, which was not chosen for any attack; chosen: "
                        f"{', '.join(sorted(used)) or '(none)'}")
    if not picks:
        raise UserError("no defense was chosen for any attack, so there is no profile to write")
    dest = write_profile(apply(results, picks), out or RunDir(run_dir).defended_profile, run_dir=run_dir)
    typer.echo(f"profile with {len(picks)} chosen defense(s): {dest}")
    typer.echo(f"measure them: safedl run {dest} --resume {run_dir}")
