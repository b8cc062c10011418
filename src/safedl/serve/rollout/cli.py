"""``safedl rollout rules`` (the default rollout rules, as YAML) and ``safedl rollout status`` (a running
service's canary state and the check that decided it), mounted by safedl.cli."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from safedl.errors import UserError

rollout_app = typer.Typer(no_args_is_help=True, help="Canary rollouts of `safedl serve` (--canary, --rollout).")


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"error: {exc}\n")
    raise typer.Exit(2)


@rollout_app.command("rules")
def rollout_rules() -> None:
    """Print the default rollout rules (they apply when `safedl serve --canary` has no --rollout FILE)."""
    from safedl.serve.rollout.config import DEFAULT_RULES

    typer.echo(DEFAULT_RULES, nl=False)


def read_token(path: Path) -> str:
    """The API key in ``path`` (first line, stripped); UserError naming the file."""
    try:
        token = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise UserError(f"--key-file {path}: cannot read an API key from it ({type(exc).__name__})") from None
    return token


def status_line(s: dict) -> str:
    """One line: the state, the versions and the check that decided it."""
    by = s.get("decided_by")
    if isinstance(by, dict):
        bound = "-" if by.get("bound") is None else f"{by['bound']:.4g}"
        why = f"{by.get('check')}: bound {bound} vs limit {by.get('limit')} (n={by.get('n')})"
    else:
        why = str(by)
    return (f"{s['state']}  stable={s['stable_version']} candidate={s.get('candidate_version')} "
            f"fraction={s['fraction']:g} step={s['step'] + 1}/{len(s['steps'])}  decided by {why}")


@rollout_app.command("status")
def rollout_status(url: str = typer.Option(..., "--url", help="the service, e.g. http://127.0.0.1:8000"),
                   key_file: Path = typer.Option(..., "--key-file", help="a file holding an admin API key"),
                   as_json: bool = typer.Option(False, "--json", help="the full state as JSON"),
                   allow_remote: bool = typer.Option(False, "--allow-remote", help="a non-loopback --url")) -> None:
    """Print the canary's state (progressing, promoted, rolled_back, aborted, shadowing or idle) and the check
    that decided it. Exit 1 when rolled back."""
    from safedl.serve.client import ServiceClient, ServiceError

    try:
        client = ServiceClient(url, token=read_token(key_file), allow_remote=allow_remote, max_retries=0)
        try:
            s = client.request("GET", "/v1/admin/rollout")
        finally:
            client.close()
    except (ServiceError, OSError) as exc:
        sys.stderr.write(f"error: {url}: {exc}\n")
        raise typer.Exit(2)
    except UserError as exc:
        _fail(exc)
    typer.echo(json.dumps(s, indent=2) if as_json else status_line(s))
    if s["state"] == "rolled_back":
        raise typer.Exit(1)
