"""``safedl export-results RUN_DIR --layout safe-dl``: a run's defense results in the Safe-DL framework's layout.

    OUT/results/<category>/<attack id>/<defense id>_results.json   the defense entry, its attack, the chance flag
    OUT/results/<category>/<attack id>/<defense id>_report.md      the same as Markdown
    OUT/results/<category>/<attack id>/<defense id>_removed_indices.json   cleansers: indices into the poisoned
                                                                           training set they removed
    OUT/results/<category>/<attack id>/<defense id>_examples/example_<i>.png   up to 5 images per defense

Examples are the removed training images a cleanser saved (``evaluation.n_examples`` > 0), else the defense's own
figures from the run (``output.figures``). Everything is built in a temporary folder beside OUT and renamed into
place, so OUT is either complete or absent.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safedl.decide.chance import chance_flags
from safedl.errors import UserError
from safedl.report.render import flatten, fmt_metric

MAX_EXAMPLES = 5
LAYOUTS = ("safe-dl",)


def _safe(name: str) -> str:
    """A path component: anything outside letters, digits, ``._@-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", str(name)) or "_"


def _example_sources(entry: dict[str, Any], run_dir: Path) -> list[Path]:
    paths = [e["path"] for e in entry.get("examples", [])] or [
        p for p in entry.get("artifacts", {}).values() if str(p).lower().endswith(".png")]
    return [run_dir / p for p in paths if (run_dir / p).is_file()][:MAX_EXAMPLES]


def _record(d: dict[str, Any], attack: dict[str, Any], flag: dict[str, Any] | None,
            examples: list[str]) -> dict[str, Any]:
    keep = ("id", "name", "kind", "against", "params", "metrics", "per_class", "notes", "info", "confusion",
            "confusion_evasion", "time_s")
    return {"defense": {k: d[k] for k in keep if k in d},
            "attack": {k: attack.get(k) for k in ("id", "name", "category", "params", "metrics")},
            "at_chance": flag, "removed_count": len(d["removed_indices"]) if "removed_indices" in d else None,
            "examples": examples}


def _markdown(d: dict[str, Any], attack: dict[str, Any], flag: dict[str, Any] | None, examples: list[str]) -> str:
    lines = [f"# {d['id']} vs {attack['id']} ({attack['category']})", "",
             f"Defense `{d.get('name', d['id'])}` ({d.get('kind', '')}) against attack `{attack.get('name')}`.", ""]
    if flag:
        lines += [f"**AT CHANCE**: {flag['reason']}.", ""]
    params = d.get("params") or {}
    lines += ["Parameters: " + (", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"), "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_metric(v)} |" for k, v in flatten(d.get("metrics", {})).items()]
    if "removed_indices" in d:
        lines += ["", f"Removed {len(d['removed_indices'])} training samples "
                      f"(indices: `{_safe(d['id'])}_removed_indices.json`)."]
    if d.get("notes"):
        lines += [""] + [f"- {n}" for n in d["notes"]]
    if examples:
        lines += [""] + [f"![example {i}]({p})" for i, p in enumerate(examples)]
    return "\n".join(lines) + "\n"


def _write_defense(folder: Path, d: dict[str, Any], attack: dict[str, Any], flag: dict[str, Any] | None,
                   run_dir: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = _safe(d["id"])
    examples = []
    for i, src in enumerate(_example_sources(d, run_dir)):
        dest = folder / f"{stem}_examples" / f"example_{i}.png"
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dest)
        examples.append(f"{stem}_examples/{dest.name}")
    files = [folder / f"{stem}_results.json", folder / f"{stem}_report.md"]
    files[0].write_text(json.dumps(_record(d, attack, flag, examples), indent=2, default=str), encoding="utf-8")
    files[1].write_text(_markdown(d, attack, flag, examples), encoding="utf-8")
    if "removed_indices" in d:
        files.append(folder / f"{stem}_removed_indices.json")
        files[-1].write_text(json.dumps({"defense": d["id"], "attack": attack["id"],
                                         "indices_into": "the attack's poisoned training set (safedl order)",
                                         "indices": d["removed_indices"]}), encoding="utf-8")
    return files + [folder / e for e in examples]


def export_safe_dl(results: dict[str, Any], run_dir: Path, out: Path, *, force: bool = False) -> list[Path]:
    """Write the layout (module docstring) to ``out``; returns the files written (paths under ``out``)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; give a new folder or --force to replace it")
    attacks = {a["id"]: a for a in results.get("attacks", [])}
    flags = {f["subject"]: f for f in chance_flags(results)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written: list[Path] = []
        for d in results.get("defenses", []):
            attack = attacks.get(d["against"])
            if attack is None:
                continue
            folder = tmp / "results" / _safe(attack["category"]) / _safe(attack["id"])
            written += _write_defense(folder, d, attack, flags.get(f"{d['id']} vs {d['against']}"), run_dir)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / p.relative_to(tmp) for p in written]
