"""Where a test file belongs: ``tests/test_<subject>[_<aspect>].py``, ``<subject>`` mirroring the tested module.

``<subject>`` is the dotted path under ``src/safedl`` of the module or package the file mainly tests, dots as
underscores and a private module's leading underscore dropped (``serve/rollout/checks.py`` ->
``test_serve_rollout_checks.py``, ``attacks/evasion/_apgd.py`` -> ``test_attacks_evasion_apgd*.py``), or one of
two reserved subjects: ``package`` (safedl as a whole: the public API, the import graph) and ``e2e`` (flows through
``safedl run`` or several commands end to end). The longest matching subject wins.

Usage: ``python tests/tools/where.py [FILE ...]`` (no file: every ``tests/test_*.py``). Prints each file's subject,
or for a file that fits no subject the name suggested from the safedl module it imports most; exit 1 if any file
does not fit.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path

log = logging.getLogger("where")

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src" / "safedl"
RESERVED = {"package": "src/safedl (the package as a whole)", "e2e": "end to end (several packages through the CLI)"}
_IMPORT = re.compile(r"^\s*(?:from|import)\s+safedl\.([\w.]+)", re.MULTILINE)


def subjects(*, src: Path = SRC) -> dict[str, str]:
    """Every subject name (module or package path, underscores) -> its source path, plus the reserved ones."""
    out = dict(RESERVED)
    for folder in sorted(d for d in src.rglob("*") if d.is_dir() and d.name != "__pycache__"):
        parts = folder.relative_to(src).parts
        if "migrations" not in parts:
            out["_".join(p.lstrip("_") for p in parts)] = str(folder.relative_to(src.parents[1]))
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        if parts and "migrations" not in parts:
            out["_".join(p.lstrip("_") for p in parts)] = str(path.relative_to(src.parents[1]))
    return out


def subject_of(*, name: str, known: dict[str, str]) -> str | None:
    """The longest subject that ``name`` (``test_<subject>[_<aspect>]``, no ``.py``) starts with, or None."""
    if not name.startswith("test_"):
        return None
    stem = name[len("test_"):]
    fits = [s for s in known if stem == s or stem.startswith(s + "_")]
    return max(fits, key=len) if fits else None


def suggest(*, path: Path, known: dict[str, str]) -> str:
    """A file name from the safedl module the file imports most (ties: the more specific module)."""
    counts = Counter(m for m in _IMPORT.findall(path.read_text(encoding="utf-8")))
    ranked = sorted(counts, key=lambda m: (counts[m], m.count(".")), reverse=True)
    for module in ranked:
        subject = "_".join(p.lstrip("_") for p in module.split("."))
        if subject in known:
            return f"tests/test_{subject}_<aspect>.py (or tests/test_{subject}.py)"
    return "tests/test_e2e_<what>.py if it runs whole flows, else tests/test_<subject>_<aspect>.py"


def check(*, files: list[Path]) -> int:
    """Log each file's subject or a suggestion; the number of files that fit no subject."""
    known, misfits = subjects(), 0
    for path in files:
        subject = subject_of(name=path.stem, known=known)
        if subject is None:
            misfits += 1
            log.warning("%s: fits no subject; move it to %s", path, suggest(path=path, known=known))
        else:
            log.info("%s: %s (%s)", path, subject, known[subject])
    return misfits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return 1 if check(files=args.files or sorted(TESTS.glob("test_*.py"))) else 0


if __name__ == "__main__":
    sys.exit(main())
