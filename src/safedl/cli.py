"""The `safedl` command line: init, validate, list, run, report.

Exit codes of every command: 0 success (``run``: gate passed or not configured), 1 release gate failed (and nothing
else), 2 bad input (one message naming the file/key/value and what is allowed, no traceback), 3 internal error (a
bug: the traceback is printed), 130 interrupted (Ctrl-C or SIGTERM; ``run`` says how to resume).
"""
from __future__ import annotations

import logging
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from safedl.errors import UserError
from safedl.rundir import RunDir

log = logging.getLogger("safedl")
EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130


def _error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


def _fail(exc: BaseException, code: int = EXIT_BAD_INPUT) -> None:
    """Print one error line and exit (commands may also just raise UserError: the group does the same)."""
    _error(str(exc))
    raise typer.Exit(code)


class _Commands(TyperGroup):
    """Every registered command runs under one error policy: a user mistake is one line and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own exits and usage errors (exit 2)
            raise
        except UserError as exc:
            _error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as exc:  # a path the user gave cannot be read or written (permissions, a folder, disk full)
            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{exc.strerror or exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception:  # noqa: BLE001 - a bug: show it, but never with the gate's exit code
            traceback.print_exc()
            _error("internal error (a bug in safedl; the traceback is above)")
            raise typer.Exit(EXIT_INTERNAL) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Assess and harden PyTorch image classifiers against evasion, poisoning and backdoor attacks.")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """safedl's own log lines at INFO (DEBUG with -v, WARNING with -q); other libraries' only from WARNING up."""
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, console=Console(stderr=True, highlight=False))
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _device(name: str):
    """--device as a torch.device, or a UserError naming what is allowed."""
    import torch

    from safedl.utils.tensors import resolve_device

    try:
        dev = resolve_device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device safedl can use; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: safedl runs on cpu or cuda; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


@contextmanager
def _naming(profile: Path) -> Iterator[None]:
    """Profile errors found after loading (plan, data, model checks) name the profile file too."""
    from safedl.errors import ProfileError

    try:
        yield
    except ProfileError as exc:
        if exc.path is None:
            raise ProfileError(f"{profile}: {exc}", errors=exc.errors, path=str(profile)) from None
        raise


def _require_gate(prof, source: Path) -> None:
    if not prof.evaluation.gate.thresholds():
        raise UserError(f"{source}: --require-gate: evaluation.gate sets no threshold, so the release gate would "
                        "check nothing; set at least one (e.g. min_clean_accuracy, min_robust_accuracy, "
                        "min_adaptive_robust_accuracy, max_attack_success_rate_after, max_risk)")


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

    if path.is_dir():
        raise UserError(f"{path} is a folder; give the path of the profile file to write (e.g. {path / 'profile.yaml'})")
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    flags = {k: v for k, v in dict(access=access, outputs=outputs, data_source=data_source, goal=goal,
                                   sensitivity=sensitivity, deployment=deployment, dataset=dataset,
                                   model=model).items() if v is not None}
    write_profile(path, flags=flags, interactive=interactive, force=force)
    typer.echo(f"wrote {path}")


@app.command()
def validate(profile: Path = typer.Argument(..., help="threat profile (YAML)"),
             require_gate: bool = typer.Option(False, "--require-gate", help="an error if the gate sets no threshold"),
             check_data: bool = typer.Option(True, "--check-data/--schema-only",
                                             help="also load the data and build the model (class counts, shapes, "
                                                  "whether every defense can work with the model)")) -> None:
    """Check a profile and report every error at once (exit code 2 if any)."""
    from safedl.profile import load_profile

    prof = load_profile(profile)
    if require_gate:
        _require_gate(prof, profile)
    if check_data:
        from safedl.run import prepare, resolve_paths

        with _naming(profile):
            prepare(resolve_paths(prof, profile.parent), base_dir=profile.parent)
    typer.echo(f"{profile}: valid")


@app.command(name="list")
def list_components(kind: Optional[str] = typer.Argument(None, help="component kind (default: all kinds)")) -> None:
    """List registered components with their parameters, types and defaults."""
    from safedl import registry

    kinds = registry.KINDS if kind is None else (kind,)
    for k in kinds:
        names = registry.names(k)
        typer.echo(f"{k}:")
        if not names:
            typer.echo("  (none)")
        for n in names:
            typer.echo(f"  {n}: {registry.summary(registry.get(k, n))}")
            for p in registry.params(k, n):
                default = "required" if p.required else f"default {p.default!r}"
                typer.echo(f"      {p.name}: {p.type or 'any'} ({default})")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job cancelled, `kill`) is handled exactly like Ctrl-C."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners): leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@app.command()
def run(profile: Optional[Path] = typer.Argument(None, help="threat profile (YAML); with --resume defaults to the run's copy"),
        resume: Optional[Path] = typer.Option(None, "--resume", help="finish or update this run directory"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="parent folder of run directories (default: profile output.dir)"),
        require_gate: bool = typer.Option(False, "--require-gate",
                                          help="CI: refuse (exit 2) a profile whose release gate sets no threshold"),
        verbose: bool = typer.Option(False, "--verbose", "-v"), quiet: bool = typer.Option(False, "--quiet", "-q"),
        no_progress: bool = typer.Option(False, "--no-progress", help="hide progress bars"),
        junit: Optional[Path] = typer.Option(None, "--junit", help="write a JUnit XML file: one testcase per gate check"),
        slo: Optional[Path] = typer.Option(None, "--slo", help="SLO file whose objectives become gate thresholds"),
        recommend: bool = typer.Option(False, "--recommend", help="also rank defenses and write RUN_DIR/recommended.yaml"),
        executor: Optional[str] = typer.Option(None, "--executor",
                                               help="serial, process or ray (default: the profile's execution.executor)"),
        workers: Optional[int] = typer.Option(None, "--workers", min=1, help="stages at a time"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                  help="existing Ray cluster: auto or ray://HOST:10001"),
        threads_per_task: Optional[int] = typer.Option(None, "--threads-per-task", min=1,
                                                       help="torch threads per stage"),
        mlflow_uri: Optional[str] = typer.Option(None, "--mlflow", help="log the run to this MLflow tracking URI "
                                                 "(e.g. sqlite:///PATH/mlflow.db; needs safedl[mlflow])")) -> None:
    """Run the assessment a profile describes; writes RUN_DIR/results.json, report.md and report.html.

    Exit codes: 0 gate passed (or not configured), 1 gate failed, 2 bad input, 3 internal error, 130 interrupted
    (Ctrl-C or SIGTERM; resume with --resume RUN_DIR).
    """
    _setup_logging(verbose, quiet)
    from safedl.utils.progress import set_enabled

    if no_progress:
        set_enabled(False)
    from safedl.run import Run, is_run_dir, run_assessment
    from safedl.profile import load_profile

    dev = _device(device)
    if resume is not None:
        if not resume.is_dir() or not is_run_dir(resume):
            raise UserError(f"--resume {resume}: not a safedl run directory (a folder that `safedl run` created, "
                            "holding safedl-run.json and profile.yaml)")
        profile = profile or RunDir(resume).profile
    if profile is None:
        raise UserError("give a PROFILE (or --resume RUN_DIR)")
    prof = _with_execution(load_profile(profile), executor=executor, workers=workers, ray_address=ray_address,
                           threads_per_task=threads_per_task)
    if slo is not None:
        from safedl.decide.slo import profile_with_slo

        prof = profile_with_slo(prof, slo)
    if require_gate:
        _require_gate(prof, profile)
    base_dir = profile.parent if resume is None or profile != RunDir(resume).profile else Path(".")
    run_dir = resume if resume is not None else Run.new_run_dir(prof, runs_dir)
    try:
        with _sigterm_as_interrupt(), _naming(profile):
            run_dir, results = run_assessment(prof, base_dir=base_dir, run_dir=run_dir, device=dev)
    except KeyboardInterrupt:
        if run_dir.is_dir():
            sys.stderr.write(f"interrupted: finished stages are saved in {run_dir}; continue with "
                             f"`safedl run --resume {run_dir}`\n")
        else:
            sys.stderr.write("interrupted before the run directory was created; nothing was written\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _decision_artifacts(run_dir, results, junit=junit, recommend=recommend)
    if mlflow_uri is not None:
        from safedl.tracking.mlflow_store import log_run
        typer.echo(f"logged to MLflow {mlflow_uri}: run {log_run(run_dir, uri=mlflow_uri)}")
    _print_outcome(run_dir, results["gate"])


def _print_outcome(run_dir: Path, gate: dict) -> None:
    from safedl.decide.gate import gate_summary

    typer.echo(f"run directory: {run_dir}")
    typer.echo(f"report: {RunDir(run_dir).report_md}")
    if not gate.get("configured", True):
        typer.echo("release gate: NOT CONFIGURED (evaluation.gate sets no threshold; nothing was checked; "
                   "use --require-gate in CI to make this an error)")
        for f in gate.get("failures", []):  # always-on checks (models at chance, failed stages) still say so
            typer.echo(f"  - {f}")
        raise typer.Exit(0)
    typer.echo(f"release gate: {'PASSED' if gate['passed'] else 'FAILED'}")
    typer.echo(f"  {gate_summary(gate)}")
    for f in gate["failures"]:
        typer.echo(f"  - {f}")
    raise typer.Exit(0 if gate["passed"] else EXIT_GATE_FAILED)


def _with_execution(prof, **options):
    """The profile with its ``execution`` section overridden by the command-line options that were given."""
    from safedl.profile import ExecutionSpec

    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return prof
    if "ray_address" in given:
        if given.setdefault("executor", "ray") != "ray":
            raise UserError(f"--ray-address is for --executor ray, not --executor {given['executor']}")
    from safedl.executors import EXECUTORS

    if given.get("executor", EXECUTORS[0]) not in EXECUTORS:
        raise UserError(f"--executor {given['executor']!r}: executors are: {', '.join(EXECUTORS)}")
    execution = ExecutionSpec.model_validate({**prof.execution.model_dump(), **given})
    return prof.model_copy(update={"execution": execution})


def _decision_artifacts(run_dir: Path, results: dict, *, junit: Optional[Path], recommend: bool) -> None:
    """gate.json (and --junit, --recommend) for a finished run."""
    from safedl.report.junit import write_ci_artifacts

    write_ci_artifacts(results, run_dir, junit=junit)
    if junit is not None:
        typer.echo(f"junit: {junit}")
    if recommend:
        from safedl.decide.recommend import write_recommendations

        out = write_recommendations(run_dir, results)
        typer.echo(f"recommendations: {out['markdown']}; profile with them: {out['profile']}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory holding results.json (or the results.json file)"),
           html: Optional[bool] = typer.Option(None, "--html/--no-html", help="default: the run's output.html"),
           figures: Optional[bool] = typer.Option(None, "--figures/--no-figures",
                                                  help="default: the run's output.figures")) -> None:
    """Re-render report.md / report.html from a run's results.json (honours the profile's output.html/figures)."""
    from safedl.report.render import load_results, write_reports

    path = run_dir if run_dir.is_file() else RunDir(run_dir).results
    results = load_results(path)
    out = (results.get("profile") or {}).get("output") or {}
    html = bool(out.get("html", True)) if html is None else html
    figures = bool(out.get("figures", True)) if figures is None else figures
    write_reports(results, path.parent, html=html, figures=figures)
    layout = RunDir(path.parent)
    typer.echo(f"wrote {layout.report_md}" + (f" and {layout.report_html}" if html else ""))


def _load_results(run_dir: Path) -> dict:
    """A run directory's results.json, checked (a DataError naming what is wrong)."""
    from safedl.report.render import load_results

    return load_results(RunDir(run_dir).results)


@app.command(name="recommend")
def recommend_cmd(run_dir: Path = typer.Argument(..., help="a run directory holding results.json"),
                  out: Optional[Path] = typer.Option(None, "--out", help="profile to write (default RUN_DIR/recommended.yaml)")
                  ) -> None:
    """Rank defenses for every attack that succeeded, with the evidence; write a profile with them added."""
    from safedl.decide.recommend import write_recommendations

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
    from safedl.decide.compare import compare_runs
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
def retrain(run_dir: Path = typer.Argument(..., help="the finished run the served bundle was exported from"),
            add: list[Path] = typer.Option(..., "--add", help="an .npz of labelled images for the training split "
                                                             "(`safedl review export`); repeatable"),
            device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
            runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="default: next to RUN_DIR")) -> None:
    """Rerun RUN_DIR's profile with reviewed data added (dataset.extra) as a new run, compare it with RUN_DIR on the
    same test images (paired tests) and apply its gate: exit 0 when its model may replace the served one, 1 not."""
    from safedl.run.retrain_cli import retrain_and_report

    raise typer.Exit(retrain_and_report(run_dir, added=add, device=str(_device(device)), runs_dir=runs_dir))


# `safedl export` and `safedl verify`: bundles (safedl.deploy.cli)
from safedl.deploy.cli import export_command, verify_command  # noqa: E402

app.command(name="export")(export_command)
app.command(name="verify")(verify_command)

from safedl.workflow.cli import defend_command, export_results_command  # noqa: E402  (Safe-DL workflow, issue 30)

app.command(name="export-results")(export_results_command)
app.command(name="defend")(defend_command)

# `safedl serve`, `safedl keys ...`, `safedl audit export`: the HTTP service (logic in safedl.serve.cli)
from safedl.serve.cli import audit_app, db_app, keys_app, serve_command  # noqa: E402

app.command(name="serve")(serve_command)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")

from safedl.serve.monitor.cli import monitor_app  # noqa: E402
from safedl.serve.review.cli import review_app  # noqa: E402

app.add_typer(monitor_app, name="monitor")
app.add_typer(review_app, name="review")

from safedl.serve.rollout.cli import rollout_app  # noqa: E402

app.add_typer(rollout_app, name="rollout")

from safedl.serve.ownership_cli import ownership_app  # noqa: E402

app.add_typer(ownership_app, name="ownership")

from safedl.redteam.cli import redteam_command  # noqa: E402
from safedl.redteam.gameday.cli import gameday_command  # noqa: E402

app.command(name="redteam")(redteam_command)
app.command(name="gameday")(gameday_command)
from safedl.models.cache_cli import cache_app  # noqa: E402

app.add_typer(cache_app, name="cache")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
