"""Report sections that keep a run honest: models at chance (``safedl.decide.chance``) and the full clean confusion
matrix of every model that recorded one (baseline, poisoned models, poisoning/backdoor defenses' models)."""
from __future__ import annotations

from typing import Any

from safedl.decide.chance import CHANCE_FACTOR, chance_flags

Block = tuple


def chance_blocks(results: dict[str, Any]) -> list[Block]:
    """A warning section naming every model of the run at chance; nothing when there is none."""
    flags = chance_flags(results)
    if not flags:
        return []
    return [("h", 2, "Models at chance"),
            ("p", f"**{len(flags)} model(s) predict no better than guessing** (upper 95% bound of clean accuracy "
                  f"below {CHANCE_FACTOR}/K): an attack success rate measured on such a model says nothing about "
                  "the defense. `safedl recommend` never recommends them and the release gate fails them."),
            ("list", [f"{f['subject']}: {f['reason']}" for f in flags])]


def _models(results: dict[str, Any]) -> list[tuple[str, list[list[int]]]]:
    out = []
    if results.get("baseline", {}).get("confusion"):
        out.append(("baseline", results["baseline"]["confusion"]))
    out += [(f"attack {a['id']} (poisoned model)", a["confusion"]) for a in results.get("attacks", [])
            if a.get("confusion")]
    out += [(f"defense {d['id']} vs {d['against']}", d["confusion"]) for d in results.get("defenses", [])
            if d.get("confusion")]
    return out


def confusion_blocks(results: dict[str, Any]) -> list[Block]:
    """One table per model: rows are true classes, columns predicted classes, cells test-image counts."""
    models = _models(results)
    if not models:
        return []
    names = (results.get("data") or {}).get("class_names") or []
    b: list[Block] = [("h", 2, "Confusion matrices (clean test split)"),
                      ("p", "Rows: true class; columns: predicted class; cells: number of clean test images. "
                            "A model at chance shows up as one column holding (almost) every image.")]
    for label, mat in models:
        k = len(mat)
        lab = [names[c] if c < len(names) and names[c] != str(c) else str(c) for c in range(k)]
        b.append(("h", 3, f"Confusion matrix: {label}"))
        b.append(("table", ["true \\ predicted"] + lab,
                  [[lab[i]] + [str(int(v)) for v in row] for i, row in enumerate(mat)]))
    return b


def evasion_confusion_blocks(results: dict[str, Any]) -> list[Block]:
    """One table per evasion-defended system and input set (clean, non-adaptive, adaptive): rows are true classes,
    columns the answered class and a last ``rejected`` column, cells evaluation-image counts."""
    entries = [d for d in results.get("defenses", []) if d.get("confusion_evasion")]
    if not entries:
        return []
    names = (results.get("data") or {}).get("class_names") or []
    b: list[Block] = [("h", 2, "Confusion matrices of evasion-defended systems (evaluation images)"),
                      ("p", "Rows: true class; columns: the defended system's answer, and `rejected` (a detector "
                            "flagged the image or the certifier abstained); cells: number of evaluation images. "
                            "`non-adaptive`: the attack's examples made on the undefended model; `adaptive`: the "
                            "attack re-run on the defended system (detector-aware PGD where detectors are present).")]
    for d in entries:
        for which, mat in d["confusion_evasion"]["matrices"].items():
            k = len(mat)
            lab = [names[c] if c < len(names) and names[c] != str(c) else str(c) for c in range(k)]
            b.append(("h", 3, f"Confusion matrix: defense {d['id']} vs {d['against']}, {which}"))
            b.append(("table", ["true \\ answered"] + lab + ["rejected"],
                      [[lab[i]] + [str(int(v)) for v in row] for i, row in enumerate(mat)]))
    return b
