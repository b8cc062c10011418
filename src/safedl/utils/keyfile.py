"""The bundle signing key: read from a file given on the command line (``--signing-key-file``)."""
from __future__ import annotations

from pathlib import Path

from safedl.errors import UserError

MIN_KEY_BYTES = 16


def read_signing_key(path: Path | None) -> bytes | None:
    """The key in ``path`` (surrounding white space stripped), None without a path; UserError (exit 2) if the file
    is missing or the key shorter than ``MIN_KEY_BYTES``."""
    return read_key_file(path, flag="--signing-key-file")


def read_key_file(path: Path | None, *, flag: str) -> bytes | None:
    """A secret key from the file given with ``flag`` (white space stripped); None without a path."""
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"{flag} {path}: not found")
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"{flag} {path}: the key must be at least {MIN_KEY_BYTES} bytes")
    return key
