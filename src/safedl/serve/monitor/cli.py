"""``safedl monitor calibrate`` (detector thresholds for a bundle), ``safedl monitor rules`` (the default rules) and
``safedl monitor slo-rules`` (service SLOs as burn-rate Prometheus alerts)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

monitor_app = typer.Typer(no_args_is_help=True, help="The security monitor of `safedl serve`: calibration, rules.")


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def _train_images(bundle, data: Optional[str], images: Optional[Path], split_seed: int, test_fraction: float,
                  val_fraction: float):
    if images is not None:
        from safedl.data.loaders import load_image_array

        x = load_image_array(images, flag="--images", what="benign training images")
        shape = tuple(bundle.manifest.get("data", {}).get("shape") or ())
        if shape and tuple(x.shape[1:]) != shape:
            raise UserError(f"--images {images}: shape {tuple(x.shape)}; expected N x {' x '.join(map(str, shape))}")
        return x
    from safedl.data import load_builtin, stratified_split
    from safedl.data.builtin import BUILTIN

    name = data or bundle.manifest.get("data", {}).get("name")
    if name not in BUILTIN:
        raise UserError(f"--data {name!r}: not a built-in data set ({', '.join(BUILTIN)}); pass --images FILE.npy "
                        "with benign training images instead")
    splits = stratified_split(load_builtin(name), test_fraction=test_fraction, val_fraction=val_fraction,
                              seed=split_seed)
    return splits.train.x


@monitor_app.command("calibrate")
def calibrate_command(
        bundle: Path = typer.Argument(..., help="the bundle the service will serve"),
        out: Path = typer.Option(..., "--out", help="calibration JSON (name it under `calibration:` of the config)"),
        data: Optional[str] = typer.Option(None, "--data", help="built-in data set (default: the bundle's)"),
        images: Optional[Path] = typer.Option(None, "--images", help="benign training images (.npy, N x C x H x W)"),
        split_seed: int = typer.Option(0, "--split-seed", help="seed of the run's train/val/test split"),
        test_fraction: float = typer.Option(0.2, "--test-fraction"),
        val_fraction: float = typer.Option(0.1, "--val-fraction"),
        k: int = typer.Option(50, "--k", help="stateful detector: neighbours"),
        history: int = typer.Option(1000, "--history", help="stateful detector: queries remembered per key"),
        min_queries: int = typer.Option(100, "--min-queries", help="PRADA: distances before the first test"),
        window: int = typer.Option(2000, "--window", help="PRADA: distances kept per key"),
        seed: int = typer.Option(0, "--seed", help="seed of the benign streams"),
        signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file")) -> None:
    """Measure the stateful (0.1% benign quantile) and PRADA (1%) thresholds on benign streams of the training split."""
    from safedl.deploy import load_bundle
    from safedl.utils.keyfile import read_signing_key
    from safedl.serve.monitor.calibration import calibrate, save_calibration

    try:
        b = load_bundle(bundle, signing_key=read_signing_key(signing_key_file))
        x = _train_images(b, data, images, split_seed, test_fraction, val_fraction)
        rec = calibrate(b, x, k=k, history=history, min_queries=min_queries, window=window, seed=seed)
        save_calibration(rec, out)
    except UserError as exc:
        _fail(exc)
    typer.echo(f"stateful threshold {rec['stateful']['threshold']:.6g}, PRADA delta {rec['prada']['delta']:.6g} "
               f"(bundle {rec['bundle_version']}, {sum(rec['streams'])} benign queries, {rec['seconds']} s) -> {out}")


@monitor_app.command("rules")
def rules_command() -> None:
    """Print the shipped default monitor config (rules, detectors, sinks)."""
    from safedl.serve.monitor.config import DEFAULT_RULES

    typer.echo(DEFAULT_RULES.read_text(encoding="utf-8"), nl=False)


@monitor_app.command("slo-rules")
def slo_rules_command(
        slo: Path = typer.Argument(..., help="service SLO file (objectives: availability, latency; period_days)"),
        out: Optional[Path] = typer.Option(None, "--out", help="write the Prometheus rule file here (default: "
                                                                "stdout)")) -> None:
    """Turn service SLOs into multi-window burn-rate Prometheus alerts (fast 1h/5m at 14.4x, slow 6h/30m at 6x
    over a 30-day budget; SRE Workbook ch. 5)."""
    from safedl.serve.monitor.burn_rate import load_service_slo, render_rules

    try:
        text = render_rules(load_service_slo(slo), source=slo.name)
    except UserError as exc:
        _fail(exc)
    if out is None:
        typer.echo(text, nl=False)
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # never half-written
    typer.echo(f"{len(text.splitlines())} lines -> {out}")


@monitor_app.command("report")
def report_command(
        db: str = typer.Option(..., "--db", help="the audit database of `safedl serve` (alerts included): a SQLite "
                                                 "file path or a PostgreSQL URL"),
        days: int = typer.Option(7, "--days", help="whole UTC days to report, ending with --until (1-366)"),
        out: Path = typer.Option(..., "--out", help="folder for ops_report.md, .html, .json and figures/"),
        until: Optional[str] = typer.Option(None, "--until", help="last day of the period (ISO date; default: "
                                                                  "today, UTC)"),
        keys: Optional[str] = typer.Option(None, "--keys", help="the key database (key actions, for time to "
                                                                "mitigate; default: --db)")) -> None:
    """Security operations report over days: requests, attacks blocked, attack rate, flagged keys, alerts by rule,
    time to detect and to mitigate (Markdown and HTML with PNG trend charts)."""
    from safedl.report.ops_report import write_report
    from safedl.serve.monitor.weekly import weekly_data
    from safedl.serve.stores.engine import parse_target

    try:
        data = weekly_data(db, days=days, until=until, keys_db=keys)
        paths = write_report(data, out, source=parse_target(db, flag="--db").display)
    except UserError as exc:
        _fail(exc)
    s = data["summary"]
    typer.echo(f"{s['requests']} requests, {s['blocked']} of {s['images']} images blocked, {data['alerts']} alerts "
               f"-> {paths['markdown']} and {paths['html']}")
