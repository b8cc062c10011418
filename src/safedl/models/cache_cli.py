"""``safedl cache list | clear``: the content-addressed cache of trained models (``safedl.models.cache``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

cache_app = typer.Typer(no_args_is_help=True, help="The cache of trained models that runs and profiles share "
                                                   "(same data, recipe and seed: reused, not retrained).")
DIR_HELP = "cache folder (default: $SAFEDL_CACHE_DIR, else ~/.cache/safedl/models)"


def _cache(path: Optional[Path]):
    from safedl.models.cache import ModelCache

    return ModelCache(path)


@cache_app.command("list")
def list_cmd(cache_dir: Optional[Path] = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """One line per cached model: key, size, training time saved, when and what it was trained for."""
    cache = _cache(cache_dir)
    entries = cache.entries()
    for e in entries:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.created))
        typer.echo(f"{e.key[:16]}  {e.size_bytes / 1e6:8.2f} MB  {e.train_time_s:7.1f} s  {when}  {e.description}")
    total = sum(e.size_bytes for e in entries)
    typer.echo(f"{len(entries)} cached model(s), {total / 1e6:.2f} MB in {cache.root}")


@cache_app.command("clear")
def clear_cmd(cache_dir: Optional[Path] = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """Remove every cached model (the next run trains again)."""
    cache = _cache(cache_dir)
    n = cache.clear()
    typer.echo(f"removed {n} cached model(s) from {cache.root}")
