"""What `safedl serve` accepts, for the tests that hold deployment files to it: the flags its --help lists and
the defaults of its options."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def help_flags() -> frozenset[str]:
    """Every ``--flag`` in ``safedl serve --help`` (the real command in a child process, wide enough not to wrap)."""
    env = dict(os.environ, COLUMNS="250", TERM="dumb", NO_COLOR="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "safedl.cli", "serve", "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    flags = frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))
    assert "--keys" in flags and "--trusted-proxy" in flags, out.stdout[:2000]  # the parse itself works
    return flags


def defaults() -> dict[str, object]:
    """Each option's default by flag (``--max-body-mb`` -> 8.0)."""
    import typer.main

    from safedl.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    return {opt: p.default for p in serve.params for opt in p.opts if opt.startswith("--")}


def flags_in(args: list[str]) -> set[str]:
    """The ``--flag`` names used in an argument list (``--port=8000`` counts as ``--port``)."""
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}
