"""Reading and verifying a bundle directory: every file is read once, and the bytes that are verified are the bytes
that are used.

:func:`read_verified_bundle` opens the bundle directory once and walks it through that descriptor (``openat``),
opening every entry with ``O_NOFOLLOW``: a symbolic link anywhere in the bundle, a FIFO, socket or device, a
bundle of more than :data:`MAX_BUNDLE_BYTES` (or :data:`MAX_BUNDLE_FILES` files) are refused. The manifest digest
and HMAC, the schema and every listed file's sha256 are checked over the bytes read; a file the manifest does not
list is refused. ``load_bundle`` then builds the model and components from those same bytes and takes the
version from the same manifest bytes, so replacing files while a load runs (e.g. during ``POST
/v1/admin/bundle``) can make the load fail, never load something other than what was verified. The path given
for the bundle directory itself may be a symbolic link (the operator's choice, resolved once when it is opened).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import safedl
from safedl.errors import BundleError

SCHEMA_VERSION = 1
KIND = "safedl-bundle"
MANIFEST, DIGEST, WEIGHTS = "manifest.json", "manifest.sha256", "model.safetensors"
MAX_BUNDLE_BYTES = 4 * 1024 ** 3  # all files of one bundle together
MAX_BUNDLE_FILES = 1024
MAX_DEPTH = 8  # folders inside the bundle (an exported bundle has one: state/)
_CHUNK = 64 * 1024 ** 2
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class VerifiedBundle:
    """What was read from a bundle and verified: the manifest, every listed file's bytes and the version (the
    first 12 hex digits of the sha256 of the manifest bytes that were verified)."""

    root: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    version: str


def read_verified_bundle(root: str | Path, *, signing_key: bytes | None = None) -> VerifiedBundle:
    """Read the bundle at ``root`` once and verify it (schema, manifest digest and signature when a key is given,
    every listed file's sha256, no unlisted file); raises BundleError naming the file."""
    root = Path(root)
    contents = read_bundle_files(root)
    for name in (MANIFEST, DIGEST):
        if name not in contents:
            raise BundleError(f"{root / name}: missing; {root} is not a complete safedl bundle")
    raw = contents[MANIFEST]
    manifest = check_manifest(root, raw, contents[DIGEST], signing_key=signing_key)
    files = _check_files(root, manifest, contents)
    return VerifiedBundle(root=root, manifest=manifest, files=files, version=hashlib.sha256(raw).hexdigest()[:12])


class _Budget:
    """How many bytes and files may still be read."""

    def __init__(self) -> None:
        self.bytes, self.files = MAX_BUNDLE_BYTES, MAX_BUNDLE_FILES

    def take(self, path: Path, size: int) -> None:
        if size > self.bytes:
            raise BundleError(f"{path}: the bundle is larger than {MAX_BUNDLE_BYTES} bytes "
                              "(safedl.deploy.verify.MAX_BUNDLE_BYTES); refused")
        if self.files <= 0:
            raise BundleError(f"{path}: the bundle holds more than {MAX_BUNDLE_FILES} files; refused")
        self.bytes -= size
        self.files -= 1


def read_bundle_files(root: str | Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative POSIX path -> bytes), each read once through ``O_NOFOLLOW``
    descriptors; symbolic links and non-regular files are refused, the total read is bounded."""
    root = Path(root)
    if os.open not in os.supports_dir_fd or not getattr(os, "O_NOFOLLOW", 0):
        raise BundleError(f"{root}: reading a bundle safely needs openat and O_NOFOLLOW (Linux, macOS)")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise BundleError(f"{root}: not a bundle directory") from None
    out: dict[str, bytes] = {}
    try:
        _read_dir(fd, root, "", out, _Budget(), depth=0)
    finally:
        os.close(fd)
    return out


def _read_dir(dir_fd: int, root: Path, prefix: str, out: dict[str, bytes], budget: _Budget, *, depth: int) -> None:
    for name in sorted(os.listdir(dir_fd)):
        rel = prefix + name
        fd = _open_entry(dir_fd, name, root / rel)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                if depth >= MAX_DEPTH:
                    raise BundleError(f"{root / rel}: folders nested more than {MAX_DEPTH} deep; refused")
                _read_dir(fd, root, rel + "/", out, budget, depth=depth + 1)
            elif stat.S_ISREG(mode):
                out[rel] = _read_file(fd, root / rel, budget)
            else:
                raise _not_regular(root / rel, mode)
        finally:
            os.close(fd)


def _not_regular(path: Path, mode: int) -> BundleError:
    return BundleError(f"{path}: not a regular file (mode {stat.filemode(mode)}); bundles hold regular files only")


def _open_entry(dir_fd: int, name: str, path: Path) -> int:
    """A descriptor of ``name`` in ``dir_fd``; links are refused, never followed (also one swapped in after the
    lstat: ``O_NOFOLLOW`` fails on it), devices and FIFOs are refused before they are opened."""
    link = BundleError(f"{path}: a symbolic link; bundles hold regular files only and links are refused, "
                       "never followed")
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise link
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _not_regular(path, mode)
        return os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's answer to O_NOFOLLOW on a link
            raise link from None
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_file(fd: int, path: Path, budget: _Budget) -> bytes:
    """Exactly the file's bytes; a file whose size changes while it is read is refused."""
    size = os.fstat(fd).st_size
    budget.take(path, size)
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left or os.read(fd, 1):
        raise BundleError(f"{path}: changed size while it was read (the bundle is being modified); refused")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a digest read from the bundle (any text) with the one computed."""
    return hmac.compare_digest(given.strip().encode("utf-8", errors="replace"), expected.encode())


def check_manifest(root: Path, raw: bytes, digest: bytes, *, signing_key: bytes | None) -> dict[str, Any]:
    """The manifest parsed from ``raw`` once ``raw`` matches its digest file's sha256 (and HMAC, given a key)."""
    mpath, dpath = root / MANIFEST, root / DIGEST
    lines = dict(line.split(" ", 1) for line in digest.decode("utf-8", errors="replace").split("\n") if " " in line)
    if not _same(lines.get("sha256", ""), hashlib.sha256(raw).hexdigest()):
        raise BundleError(f"{mpath}: does not match its digest in {DIGEST} (the manifest was edited or truncated)")
    if signing_key is not None:
        expected = hmac.new(signing_key, raw, hashlib.sha256).hexdigest()
        if not _same(lines.get("hmac-sha256", ""), expected):
            raise BundleError(f"{dpath}: the signature does not verify with the given key (unsigned, or signed "
                              "with another key)")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: not a safedl bundle manifest")
    if manifest.get("kind") != KIND:
        raise BundleError(f"{mpath}: not a safedl bundle manifest (kind {manifest.get('kind')!r})")
    if manifest.get("bundle_schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: bundle schema version {manifest.get('bundle_schema_version')!r}; this safedl "
                          f"({safedl.__version__}) reads version {SCHEMA_VERSION}")
    return manifest


def _inside(rel: Any) -> bool:
    p = PurePosixPath(str(rel))
    return isinstance(rel, str) and bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _check_files(root: Path, manifest: dict[str, Any], contents: dict[str, bytes]) -> dict[str, bytes]:
    """The bytes of every file the manifest lists, each matching its sha256; no other file may be present."""
    listed = manifest.get("files") or {}
    if not isinstance(listed, dict):
        raise BundleError(f"{root / MANIFEST}: 'files' must map paths to sha256 digests")
    for rel, digest in listed.items():
        if not _inside(rel):
            raise BundleError(f"{root / MANIFEST}: file entry {rel!r} points outside the bundle")
        if rel not in contents:
            raise BundleError(f"{root / rel}: missing (listed in the manifest)")
        if not _same(str(digest), hashlib.sha256(contents[rel]).hexdigest()):
            raise BundleError(f"{root / rel}: sha256 does not match the manifest (the file was changed or truncated)")
    extra = sorted(set(contents) - set(listed) - {MANIFEST, DIGEST})
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in the manifest (unexpected file in the bundle)")
    return {rel: contents[rel] for rel in listed}
