"""The `safedl` command line: init, validate, list, run, report."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import ProfileError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Assess and harden PyTorch image classifiers against evasion, poisoning and backdoor attacks.")
log = logging.getLogger("safedl")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, console=_err_console())], force=True)


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(exc: BaseException, code: int = 2) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(code)


@app.command()
def init(path: Path = typer.Argument(Path("profile.yaml"), help="where to write the profile"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
         interactive: bool = typer.Option(False, "--interactive", "-i", help="answer the threat questionnaire"),
         access: Optional[str] = typer.Option(None, help="white-box | gray-box | black-box"),
         outputs: Optional[str] = typer.Option(None, help="what a query returns: scores | labels | none"),
         data_source: Optional[str] = typer.Option(None, help="trusted | curated | third_party | crowdsourced | scraped"),
         goal: Optional[str] = typer.Option(None, help="untargeted | targeted | availability | backdoor | copy | any"),
         sensitivity: Optional[str] = typer.Option(None, help="cost of a mistake: low | medium | high"),
         deployment: Optional[str] = typer.Option(None, help="cloud_api | edge_device | internal | research"),
         dataset: Optional[str] = typer.Option(None, help="data set name (default mnist5k)"),
         model: Optional[str] = typer.Option(None, help="zoo architecture (default small_cnn)")) -> None:
    """Write a threat profile: the commented default, or one that follows from the questionnaire's answers."""
    from safedl.questionnaire import write_profile

    flags = {k: v for k, v in dict(access=access, outputs=outputs, data_source=data_source, goal=goal,
                                   sensitivity=sensitivity, deployment=deployment, dataset=dataset,
                                   model=model).items() if v is not None}
    try:
        write_profile(path, flags=flags, interactive=interactive, force=force)
    except UserError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@app.command()
def validate(profile: Path = typer.Argument(..., help="threat profile (YAML)")) -> None:
    """Check a profile and report every error at once (exit code 2 if any)."""
    from safedl.profile import load_profile

    try:
        load_profile(profile)
    except ProfileError as exc:
        _fail(exc)
    typer.echo(f"{profile}: valid")


@app.command(name="list")
def list_components(kind: Optional[str] = typer.Argument(None, help="component kind (default: all kinds)")) -> None:
    """List registered components with their parameters, types and defaults."""
    from safedl import registry

    kinds = registry.KINDS if kind is None else (kind,)
    for k in kinds:
        try:
            names = registry.names(k)
        except UserError as exc:
            _fail(exc)
        typer.echo(f"{k}:")
        if not names:
            typer.echo("  (none)")
        for n in names:
            typer.echo(f"  {n}: {registry.summary(registry.get(k, n))}")
            for p in registry.params(k, n):
                default = "required" if p.required else f"default {p.default!r}"
                typer.echo(f"      {p.name}: {p.type or 'any'} ({default})")


@app.command()
def run(profile: Optional[Path] = typer.Argument(None, help="threat profile (YAML); with --resume defaults to the run's copy"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="finish or update this run directory"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="parent folder of run directories (default: profile output.dir)"),
        verbose: bool = typer.Option(False, "--verbose", "-v"), quiet: bool = typer.Option(False, "--quiet", "-q"),
        no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars")) -> None:
    """Run the assessment a profile describes; writes RUN_DIR/results.json, report.md and report.html.

    Exit codes: 0 gate passed, 1 gate failed, 2 bad input, 130 interrupted (resume with --resume RUN_DIR).
    """
    _setup_logging(verbose, quiet)
    from safedl.utils.progress import set_enabled

    if no_progress:
        set_enabled(False)
    from safedl.assess.pipeline import run_assessment
    from safedl.profile import load_profile
    from safedl.utils.tensors import resolve_device

    try:
        if resume is not None:
            if not (resume / "profile.yaml").is_file():
                raise UserError(f"--resume {resume}: not a safedl run directory (no profile.yaml in it)")
            profile = profile or resume / "profile.yaml"
        if profile is None:
            raise UserError("give a PROFILE (or --resume RUN_DIR)")
        prof = load_profile(profile)
        dev = resolve_device(device)
        base_dir = profile.parent if resume is None or profile != resume / "profile.yaml" else Path(".")
        run_dir, results = run_assessment(prof, base_dir=base_dir, run_dir=resume, runs_root=runs_dir, device=dev)
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished stages are saved; continue with `safedl run --resume RUN_DIR`\n")
        raise typer.Exit(130)
    gate = results["gate"]
    typer.echo(f"run directory: {run_dir}")
    typer.echo(f"report: {run_dir / 'report.md'}")
    typer.echo(f"release gate: {'PASSED' if gate['passed'] else 'FAILED'}")
    for f in gate["failures"]:
        typer.echo(f"  - {f}")
    raise typer.Exit(0 if gate["passed"] else 1)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory holding results.json")) -> None:
    """Re-render report.md / report.html from a run's results.json."""
    from safedl.report.render import write_reports

    path = run_dir / "results.json"
    if not path.is_file():
        _fail(UserError(f"{path}: not found"))
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        _fail(UserError(f"{path}: not valid JSON ({exc})"))
    write_reports(results, run_dir)
    typer.echo(f"wrote {run_dir / 'report.md'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
