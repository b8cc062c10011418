"""``safedl ownership verify BUNDLE --suspect BUNDLE_OR_TORCHSCRIPT --evidence QUERIES.npy --watermark-key-file F``:
is the suspect a copy of the bundle's model? (DAWN watermark verification: p-value and verdict.)"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

ownership_app = typer.Typer(no_args_is_help=True, help="Ownership proofs: is a suspect model a copy of ours?")


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def _suspect_labels(suspect: Path, x, signing_key):
    import torch

    from safedl.deploy import load_bundle

    if suspect.is_dir():
        return load_bundle(suspect, signing_key=signing_key).pipeline.decide(x).labels.cpu()
    if not suspect.is_file():
        raise UserError(f"--suspect {suspect}: no such bundle directory or TorchScript file")
    try:
        model = torch.jit.load(str(suspect), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--suspect {suspect}: not a bundle directory or a TorchScript model ({exc})") from None
    with torch.no_grad():
        return model(x).argmax(1).cpu()


@ownership_app.command("verify")
def verify_command(
        bundle: Path = typer.Argument(..., help="our bundle (the model that served the watermarked answers)"),
        suspect: Path = typer.Option(..., "--suspect", help="the suspect: a bundle directory or a TorchScript file"),
        evidence: Path = typer.Option(..., "--evidence", help="the suspected copier's queries (.npy, N x C x H x W)"),
        watermark_key_file: Path = typer.Option(..., "--watermark-key-file", help="the watermark's secret key"),
        rate: float = typer.Option(0.005, "--rate", help="the watermark rate the service answered with"),
        alpha: float = typer.Option(0.01, "--alpha", help="significance level of the verdict"),
        signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file")) -> None:
    """Print the number of watermarked queries, the suspect's matches, the p-value and the verdict."""
    from safedl.data.loaders import load_image_array
    from safedl.defenses.ownership import ResponseWatermark, verify_ownership
    from safedl.deploy import load_bundle
    from safedl.utils.keyfile import read_signing_key

    try:
        if not watermark_key_file.is_file():
            raise UserError(f"--watermark-key-file {watermark_key_file}: no such file")
        key = watermark_key_file.read_bytes().strip()
        sk = read_signing_key(signing_key_file)
        b = load_bundle(bundle, signing_key=sk)
        x = load_image_array(evidence, flag="--evidence", what="the suspected copier's queries")
        num_classes = len(b.pipeline.class_names or []) or int(b.manifest.get("data", {}).get("num_classes", 0))
        try:
            wm = ResponseWatermark(key=key, num_classes=num_classes, rate=rate)
        except ValueError as exc:
            raise UserError(f"--watermark-key-file / --rate: {exc}") from None
        victim = b.pipeline.decide(x).labels.cpu()
        v = verify_ownership(watermark=wm, evidence=x, victim_labels=victim,
                             suspect_labels=_suspect_labels(suspect, x, sk), alpha=alpha)
    except UserError as exc:
        _fail(exc)
    typer.echo(v.text())
