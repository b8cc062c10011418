"""``safedl ownership verify BUNDLE (--suspect BUNDLE_OR_TORCHSCRIPT | --suspect-url URL --suspect-key-file F)
--evidence QUERIES.npy|AUDIT_DB_OR_URL --watermark-key-file F``: is the suspect a copy of the bundle's model?
(DAWN watermark verification, Szyller et al. 2021: p-value and verdict.)"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

ownership_app = typer.Typer(no_args_is_help=True, help="Ownership proofs: is a suspect model a copy of ours?")


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def local_suspect_scores(suspect: Path, x, signing_key):
    """The suspect's scores on ``x``: a bundle's decided probabilities, or a TorchScript model's outputs."""
    import torch

    from safedl.deploy import load_bundle

    if suspect.is_dir():
        return load_bundle(suspect, signing_key=signing_key).pipeline.decide(x).probs.cpu()
    if not suspect.is_file():
        raise UserError(f"--suspect {suspect}: no such bundle directory or TorchScript file")
    try:
        model = torch.jit.load(str(suspect), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--suspect {suspect}: not a bundle directory or a TorchScript model ({exc})") from None
    with torch.no_grad():
        return model(x).cpu()


def remote_suspect_answers(url: str, key_file: Path, x, *, timeout_s: float, allow_remote: bool):
    """(scores or None, labels) of the service at ``url`` on ``x``: scores when the key's tier answers them, else
    labels; at most ``len(x)`` images are sent, within ``timeout_s``."""
    from safedl.errors import QueryBudgetExceeded
    from safedl.serve.client import RemoteClassifier, ServiceClient, ServiceError, TierError
    from safedl.utils.keyfile import read_key_file

    token = read_key_file(key_file, flag="--suspect-key-file").decode("utf-8", "replace")
    try:
        with ServiceClient(url, token=token, timeout_s=timeout_s, allow_remote=allow_remote) as client:
            for access in ("scores", "labels"):
                remote = RemoteClassifier(client, access=access, max_queries=len(x), deadline_s=timeout_s,
                                          on_reject="uniform")
                try:
                    out = remote(x)
                except TierError:
                    continue
                return (out.exp(), out.argmax(1)) if access == "scores" else (None, out.argmax(1))
    except (ServiceError, QueryBudgetExceeded, OSError) as exc:
        raise UserError(f"--suspect-url {url}: {exc}") from None
    raise UserError(f"--suspect-url {url}: the key's tier answers neither scores nor labels")


def audit_evidence(db: str, images: Optional[Path], key_id: Optional[str]):
    """The evidence images among ``images`` that the audit ``db`` shows were answered (to ``key_id``, if given).

    The audit stores a SHA-256 per answered image, never its pixels: it proves which images a key sent and were
    answered, but cannot by itself give the trigger set. Images sent as float32 ``.npy`` (the safedl client's
    encoding) match by the hash of their pixels; images sent as PNG/JPEG files hash as the file, so they match only
    when those files are hashed (not supported here).
    """
    from safedl.data.loaders import load_image_array
    from safedl.serve.audit import read_rows

    sent = {r["input_sha256"] for r in read_rows(db) if r.get("http_status") == 200 and r.get("input_sha256")
            and (key_id is None or r.get("key_id") == key_id)}
    who = f"key {key_id}" if key_id else "all keys"
    if images is None:
        raise UserError(f"--evidence {db}: the audit stores input hashes only ({len(sent)} answered images of "
                        f"{who}), not the images; give the candidate images with --evidence-images X.npy and the "
                        "audit selects those that were sent")
    x = load_image_array(images, flag="--evidence-images", what="candidate images")
    keep = [i for i in range(len(x)) if hashlib.sha256(x[i].contiguous().numpy().tobytes()).hexdigest() in sent]
    if not keep:
        raise UserError(f"--evidence {db}: none of the {len(x)} images of --evidence-images {images} was answered "
                        f"to {who} (hashes of their float32 pixels)")
    return x[keep]


def _evidence(evidence: str, images: Optional[Path], key_id: Optional[str]):
    from safedl.data.loaders import load_image_array

    if evidence.endswith(".npy"):
        return load_image_array(evidence, flag="--evidence", what="the suspected copier's queries")
    return audit_evidence(evidence, images, key_id)


@ownership_app.command("verify")
def verify_command(
        bundle: Path = typer.Argument(..., help="our bundle (the model that served the watermarked answers)"),
        suspect: Optional[Path] = typer.Option(None, "--suspect", help="a bundle directory or a TorchScript file"),
        suspect_url: Optional[str] = typer.Option(None, "--suspect-url", help="the suspect's safedl-style HTTP "
                                                                              "endpoint (http://HOST:PORT)"),
        suspect_key_file: Optional[Path] = typer.Option(None, "--suspect-key-file", help="API key for --suspect-url"),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="let --suspect-url leave this machine"),
        timeout_s: float = typer.Option(120.0, "--suspect-timeout-s", help="wall-time bound of the suspect's queries"),
        evidence: str = typer.Option(..., "--evidence", help="the suspected copier's queries (.npy N x C x H x W), "
                                                             "or the service's audit database (PATH_OR_URL)"),
        evidence_images: Optional[Path] = typer.Option(None, "--evidence-images", help="with an audit --evidence: "
                                                       "candidate images (.npy); those the audit shows sent are used"),
        key_id: Optional[str] = typer.Option(None, "--key-id", help="with an audit --evidence: the copier's key id"),
        watermark_key_file: Path = typer.Option(..., "--watermark-key-file", help="the watermark's secret key"),
        rate: float = typer.Option(0.005, "--rate", help="the watermark rate the service answered with"),
        alpha: float = typer.Option(0.01, "--alpha", help="significance level of the verdict"),
        signing_key_file: Optional[Path] = typer.Option(None, "--signing-key-file")) -> None:
    """Print the number of watermarked queries, the suspect's matches, the p-value and the verdict."""
    from safedl.defenses.ownership import ResponseWatermark, verify_ownership
    from safedl.deploy import load_bundle
    from safedl.utils.keyfile import read_key_file, read_signing_key

    try:
        if (suspect is None) == (suspect_url is None):
            raise UserError("give one suspect: --suspect BUNDLE_OR_TORCHSCRIPT or --suspect-url URL")
        if suspect_url is not None and suspect_key_file is None:
            raise UserError("--suspect-url needs --suspect-key-file (the API key to query it with)")
        key = read_key_file(watermark_key_file, flag="--watermark-key-file")
        sk = read_signing_key(signing_key_file)
        b = load_bundle(bundle, signing_key=sk)
        x = _evidence(evidence, evidence_images, key_id)
        num_classes = len(b.pipeline.class_names or []) or int(b.manifest.get("data", {}).get("num_classes", 0))
        try:
            wm = ResponseWatermark(key=key, num_classes=num_classes, rate=rate)
        except ValueError as exc:
            raise UserError(f"--watermark-key-file / --rate: {exc}") from None
        victim = b.pipeline.decide(x).labels.cpu()
        mask, _ = wm.select(x, victim)
        if not bool(mask.any()):
            raise UserError(f"--evidence: none of the {len(x)} evidence images is watermarked (rate {rate:g}); "
                            "give more of the suspected copier's queries")
        xw, vw = x[mask], victim[mask]  # only the watermarked images are shown to the suspect
        if suspect is not None:
            scores, labels = local_suspect_scores(suspect, xw, sk), None
        else:
            scores, labels = remote_suspect_answers(suspect_url, suspect_key_file, xw, timeout_s=timeout_s,
                                                    allow_remote=allow_remote)
        v = verify_ownership(watermark=wm, evidence=xw, victim_labels=vw, alpha=alpha,
                             suspect_scores=scores, suspect_labels=None if scores is not None else labels)
    except UserError as exc:
        _fail(exc)
    typer.echo(v.text())
