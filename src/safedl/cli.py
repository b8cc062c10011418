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
        no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars"),
        junit: Optional[Path] = typer.Option(None, "--junit", help="write a JUnit XML file: one testcase per gate check"),
        slo: Optional[Path] = typer.Option(None, "--slo", help="SLO file whose objectives become gate thresholds"),
        recommend: bool = typer.Option(False, "--recommend", help="also rank defenses and write RUN_DIR/recommended.yaml")
        ) -> None:
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
        if slo is not None:
            from safedl.assess.slo import profile_with_slo

            prof = profile_with_slo(prof, slo)
        dev = resolve_device(device)
        base_dir = profile.parent if resume is None or profile != resume / "profile.yaml" else Path(".")
        run_dir, results = run_assessment(prof, base_dir=base_dir, run_dir=resume, runs_root=runs_dir, device=dev)
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished stages are saved; continue with `safedl run --resume RUN_DIR`\n")
        raise typer.Exit(130)
    _decision_artifacts(run_dir, results, junit=junit, recommend=recommend)
    gate = results["gate"]
    typer.echo(f"run directory: {run_dir}")
    typer.echo(f"report: {run_dir / 'report.md'}")
    typer.echo(f"release gate: {'PASSED' if gate['passed'] else 'FAILED'}")
    for f in gate["failures"]:
        typer.echo(f"  - {f}")
    raise typer.Exit(0 if gate["passed"] else 1)


def _decision_artifacts(run_dir: Path, results: dict, *, junit: Optional[Path], recommend: bool) -> None:
    """gate.json (and --junit, --recommend) for a finished run."""
    from safedl.report.junit import write_ci_artifacts

    write_ci_artifacts(results, run_dir, junit=junit)
    if junit is not None:
        typer.echo(f"junit: {junit}")
    if recommend:
        from safedl.assess.recommend import write_recommendations

        out = write_recommendations(run_dir, results)
        typer.echo(f"recommendations: {out['markdown']}; profile with them: {out['profile']}")


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


def _load_results(run_dir: Path) -> dict:
    """A run directory's results.json, or a UserError naming what is wrong."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (give a run directory written by `safedl run`)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(results, dict) or not {"profile", "attacks", "baseline"} <= set(results):
        raise UserError(f"{path}: not a safedl results file (needs profile, baseline and attacks)")
    return results


@app.command(name="recommend")
def recommend_cmd(run_dir: Path = typer.Argument(..., help="a run directory holding results.json"),
                  out: Optional[Path] = typer.Option(None, "--out", help="profile to write (default RUN_DIR/recommended.yaml)")
                  ) -> None:
    """Rank defenses for every attack that succeeded, with the evidence; write a profile with them added."""
    from safedl.assess.recommend import write_recommendations

    try:
        paths = write_recommendations(run_dir, _load_results(run_dir), out=out)
    except UserError as exc:
        _fail(exc)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"profile with the recommended defenses: {paths['profile']}\n"
               f"measure them: safedl run {paths['profile']} --resume {run_dir}")


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="run directories; the first is the reference"),
            out: Path = typer.Option(Path("comparison"), "--out", help="folder for comparison.md/.html/.json"),
            fail_on_regression: bool = typer.Option(False, "--fail-on-regression",
                                                    help="exit 1 when any metric got significantly worse")) -> None:
    """Compare runs on the same test images: differences, paired tests (McNemar) and verdicts per metric."""
    from safedl.assess.compare import compare_runs
    from safedl.report.compare_report import write_comparison

    try:
        runs = [(d.name, _load_results(d)) for d in run_dirs]
        cmp = compare_runs(runs)
    except UserError as exc:
        _fail(exc)
    paths = write_comparison(cmp, runs, out)
    for c in cmp["comparisons"]:
        typer.echo(f"{c['run']} vs {cmp['reference']}:")
        for r in c["rows"]:
            typer.echo(f"  {r['metric']}: {r['a']['value']:.4f} -> {r['b']['value']:.4f} ({r['diff']:+.4f}, "
                       f"p_holm={r['p_holm']:.3g}) {r['verdict']}")
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")
    if fail_on_regression and cmp["regressions"]:
        typer.echo(f"regression: {len(cmp['regressions'])} metric(s) significantly worse")
        raise typer.Exit(1)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a finished run directory"),
           out: Path = typer.Option(..., "--out", help="bundle directory to write (must not exist)"),
           defense: Optional[str] = typer.Option(None, "--defense", help="id of an evaluated evasion defense"),
           baseline: bool = typer.Option(False, "--baseline", help="export the undefended baseline model"),
           signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file",
                                                           help="sign the manifest with HMAC-SHA256 and this key")) -> None:
    """Export the defended system of one evaluated defense (or the baseline) as a verified bundle."""
    from safedl.deploy.run_export import export_from_run

    try:
        if (defense is None) == (not baseline):
            raise UserError("give exactly one of --defense ID or --baseline")
        key = _read_key(signing_key_file)
        path = export_from_run(run_dir, out=out, defense=defense, signing_key=key)
    except UserError as exc:
        _fail(exc)
    typer.echo(f"wrote bundle {path}")


@app.command(name="verify")
def verify_bundle(bundle: Path = typer.Argument(..., help="bundle directory"),
                  signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file",
                                                                  help="require a valid HMAC signature")) -> None:
    """Verify a bundle (schema, manifest digest or signature, every file's sha256) and rebuild its system."""
    from safedl.deploy import load_bundle

    try:
        b = load_bundle(bundle, signing_key=_read_key(signing_key_file))
    except UserError as exc:
        _fail(exc)
    names = [f"{c['kind']}:{c['name']}" for c in b.manifest["components"]] or ["(undefended model)"]
    typer.echo(f"{bundle}: verified, version {b.version}; components: {', '.join(names)}")


def _read_key(path: Optional[Path]) -> Optional[bytes]:
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"--signing-key-file {path}: not found")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise UserError(f"--signing-key-file {path}: the key must be at least 16 bytes")
    return key


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
