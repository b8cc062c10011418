"""`safedl export` and `safedl verify`: a run's defended system as a verified bundle, and the check of one.

Registered on the CLI's group (safedl.cli), whose error policy turns a UserError into one line and exit 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError
from safedl.utils.keyfile import read_signing_key

_DETECTOR_FAILURE_HELP = ("a detector that raises, times out or gives no finite score: fail_closed (503) or "
                          "fail_open (answered without it; counted, logged, audited)")
_SANITY_HELP = ("refuse answers above --sanity-max-confidence on inputs beyond the --sanity-quantile distance of the "
                "run's validation images from its training data")


def export_command(
        run_dir: Path = typer.Argument(..., help="a finished run directory"),
        out: Path = typer.Option(..., "--out", help="bundle directory to write (must not exist)"),
        defense: Optional[str] = typer.Option(None, "--defense", help="id of an evaluated evasion defense"),
        baseline: bool = typer.Option(False, "--baseline", help="export the undefended baseline model"),
        signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file",
                                                        help="sign the manifest with HMAC-SHA256 and this key"),
        detector_failure: str = typer.Option("fail_closed", "--detector-failure", help=_DETECTOR_FAILURE_HELP),
        detector_timeout_s: float = typer.Option(5.0, "--detector-timeout-s", help="seconds a detector may take"),
        output_sanity: bool = typer.Option(False, "--output-sanity", help=_SANITY_HELP),
        sanity_max_confidence: float = typer.Option(0.99, "--sanity-max-confidence", help="(--output-sanity)"),
        sanity_quantile: float = typer.Option(0.999, "--sanity-quantile", help="(--output-sanity)"),
        drift_reference: bool = typer.Option(True, "--drift-reference/--no-drift-reference",
                                             help="store the validation split's features and labels for drift "
                                                  "tests in `safedl serve`"),
        probes: int = typer.Option(200, "--probes", help="labelled probe images per source stored in the bundle "
                                                          "(held-out test images, the run's adversarial and "
                                                          "triggered examples) for canary checks; 0: none"),
        register: Optional[str] = typer.Option(None, "--register", help="register the bundle as a new version "
                                               "of this MLflow model (needs --mlflow)"),
        mlflow_uri: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI for --register")) -> None:
    """Export the defended system of one evaluated defense (or the baseline) as a verified bundle."""
    from safedl.deploy.detector_guard import DetectorFailurePolicy
    from safedl.deploy.output_sanity import OutputSanity
    from safedl.deploy.run_export import export_from_run

    from safedl.tracking.options import check_register, register_exported

    if probes < 0:
        raise UserError(f"--probes {probes}: must be 0 (none) or a positive number of images")
    if (defense is None) == (not baseline):
        raise UserError("give exactly one of --defense ID or --baseline")
    policy = DetectorFailurePolicy(mode=detector_failure, timeout_s=detector_timeout_s)
    sanity = OutputSanity(max_confidence=sanity_max_confidence, quantile=sanity_quantile) if output_sanity else None
    key = read_signing_key(signing_key_file)
    check_register(register, mlflow_uri)  # before anything is written
    path = export_from_run(run_dir, out=out, defense=defense, signing_key=key, detector_failure=policy,
                           output_sanity=sanity, drift_reference=drift_reference, probes=probes)
    typer.echo(f"wrote bundle {path}" + register_exported(path, name=register, uri=mlflow_uri, signing_key=key))


def verify_command(bundle: Path = typer.Argument(..., help="bundle directory"),
                   signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file",
                                                                   help="require a valid HMAC signature")) -> None:
    """Verify a bundle (schema, manifest digest or signature, every file's sha256) and rebuild its system."""
    from safedl.deploy import load_bundle

    b = load_bundle(bundle, signing_key=read_signing_key(signing_key_file))
    names = [f"{c['kind']}:{c['name']}" for c in b.manifest["components"]] or ["(undefended model)"]
    probes = "" if b.probes is None else f"; probes: {len(b.probes)} {b.probes.counts()}"
    typer.echo(f"{bundle}: verified, version {b.version}; components: {', '.join(names)}{probes}")
