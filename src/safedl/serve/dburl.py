"""Where the service's databases live: this version keeps keys, limits and the audit log in SQLite files only.

A value that looks like a database URL (``postgresql://...``, ``sqlite:///...``) is refused up front, before
anything is created, instead of being taken for a relative path and creating folders named like the URL.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from safedl.errors import UserError

# "scheme:/" at the start also catches a URL that went through Path(), which collapses "//" ("postgresql:/u@h/db")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def looks_like_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` is a URL (it contains ``://`` or starts with ``scheme:/``) rather than a file path."""
    text = os.fspath(value)
    return "://" in text or _SCHEME.match(text) is not None


def sqlite_path(value: str | os.PathLike, *, what: str) -> Path:
    """``value`` as the path of a SQLite file; a URL raises UserError naming ``what`` (a flag or a store)."""
    if looks_like_url(value):
        raise UserError(f"{what} {os.fspath(value)!r}: only SQLite file paths are supported by this version "
                        "(PostgreSQL URLs are planned); pass a file path such as keys.db or audit.db")
    return Path(value)
