"""``safedl review list | show | label | export --db PATH_OR_URL``: the review queue of ``safedl serve --review``,
read and labelled from the command line (the ``/review`` page does the same in a browser)."""
from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from safedl.errors import UserError

review_app = typer.Typer(no_args_is_help=True, help="The review queue of `safedl serve --review`: flagged and "
                                                    "rejected inputs, their labels and their export.")
DB_HELP = "the review database of `safedl serve --review`: a SQLite file path or a PostgreSQL URL"


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


def _store(db: str):
    from safedl.serve.review.store import ReviewStore

    return ReviewStore(db, flag="--db")


def _iso(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _line(d: dict) -> str:
    label = f"{d['review_label']} (by {d['labelled_by']} at {_iso(d['labelled_at'])})" if d["review_label"] else \
        "UNLABELLED"
    return (f"#{d['id']:<6} {_iso(d['ts'])} key={d['key_id'] or '-'} request={d['request_id']}[{d['image_index']}] "
            f"reason={d['reason'] or '-'} bundle={d['bundle_version'] or '-'}  {label}")


@review_app.command("list")
def review_list(db: str = typer.Option(..., "--db", help=DB_HELP),
                state: str = typer.Option("all", "--state", help="unlabelled, labelled or all"),
                limit: int = typer.Option(1000, "--limit", help="most items shown (newest first)"),
                as_json: bool = typer.Option(False, "--json", help="one JSON object per queued input")) -> None:
    """List queued inputs, newest first."""
    try:
        items = _store(db).items(state=state, limit=limit)
    except UserError as exc:
        _fail(exc)
    for item in items:
        d = item.public()
        typer.echo(json.dumps(d) if as_json else _line(d))


@review_app.command("show")
def review_show(item_id: int = typer.Argument(..., help="the item's id (`safedl review list`)"),
                db: str = typer.Option(..., "--db", help=DB_HELP),
                png: Optional[Path] = typer.Option(None, "--png", help="also write the image as this PNG file")) -> None:
    """Print one queued input's decision as JSON (detector scores, reason, key, bundle, request, label)."""
    try:
        item = _store(db).get(item_id, with_image=png is not None)
        if png is not None:
            import torch

            from safedl.serve.review.thumbnails import png_bytes
            from safedl.utils.io import atomic_write_bytes

            atomic_write_bytes(png, png_bytes(torch.from_numpy(item.image)))
    except UserError as exc:
        _fail(exc)
    typer.echo(json.dumps(item.public(), indent=2))


@review_app.command("label")
def review_label(item_id: int = typer.Argument(..., help="the item's id (`safedl review list`)"),
                 label: str = typer.Argument(..., help="attack, benign or a class name of its bundle"),
                 db: str = typer.Option(..., "--db", help=DB_HELP),
                 by: Optional[str] = typer.Option(None, "--by", help="who labels (default: the login name)")) -> None:
    """Label a queued input (again: the new label replaces the old one)."""
    try:
        item = _store(db).label(item_id, label=label, by=by if by is not None else getpass.getuser())
    except UserError as exc:
        _fail(exc)
    typer.echo(f"#{item.id}: {item.review_label} (by {item.labelled_by})")


@review_app.command("export")
def review_export(db: str = typer.Option(..., "--db", help=DB_HELP),
                  out: Path = typer.Option(..., "--out", help="the .npz to write (x, y: inputs given a class name; "
                                                               "x_attack, x_benign) and OUT.manifest.json")) -> None:
    """Write the labelled inputs as an .npz data set with a manifest (request ids, labels, who, when, hashes)."""
    from safedl.serve.review.export import export_reviewed, manifest_path

    try:
        manifest = export_reviewed(_store(db), out)
    except UserError as exc:
        _fail(exc)
    c = manifest["counts"]
    typer.echo(f"wrote {out} ({c['classes']} with a class label, {c['attack']} attack, {c['benign']} benign; "
               f"sha256 {manifest['file_sha256'][:16]}) and {manifest_path(out)}")
