"""``safedl retrain RUN_DIR --add reviewed.npz``: the run's profile again with reviewed data added to its training
split (``dataset.extra``), as a new run next to it; then the new run against the old one on the same test images
(``safedl compare``: paired McNemar tests, Holm-adjusted) and the new run's release gate decide whether its model
may replace the one served (``RUN_DIR_NEW/retrain.json``).

Nothing of the old run is reused as a result: every stage's cache key includes the training data's content hash,
so the baseline and every stage after it are computed again on the grown training split (the validation and test
splits, the seed and the recipe are the old run's)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safedl.data.loaders import load_npz
from safedl.errors import UserError
from safedl.profile import Profile, load_profile
from safedl.profile_inputs import ExtraDataSpec
from safedl.rundir import RunDir
from safedl.utils.io import atomic_write_json, file_sha256

log = logging.getLogger(__name__)


def retrain_profile(profile: Profile, added: list[Path]) -> Profile:
    """``profile`` with each file of ``added`` appended to ``dataset.extra`` (a file already there is not added
    twice)."""
    have = {str(Path(e.path).resolve()) for e in profile.dataset.extra}
    extra = list(profile.dataset.extra)
    for p in added:
        if str(p.resolve()) not in have:
            extra.append(ExtraDataSpec(format="npz", path=str(p.resolve())))
            have.add(str(p.resolve()))
    return profile.model_copy(update={"dataset": profile.dataset.model_copy(update={"extra": extra})})


def _check_inputs(run_dir: Path, added: list[Path]) -> tuple[RunDir, list[dict[str, Any]]]:
    layout = RunDir(run_dir)
    if not layout.is_run() or not layout.results.is_file():
        raise UserError(f"RUN_DIR {run_dir}: not a finished safedl run (no results.json); give the run the served "
                        "bundle was exported from")
    if not added:
        raise UserError("give at least one --add FILE.npz (e.g. `safedl review export --out reviewed.npz`)")
    files = []
    for p in added:
        data = load_npz(p)  # a missing or unreadable file: DataError naming it
        files.append({"path": str(p.resolve()), "sha256": file_sha256(p), "n": len(data)})
    return layout, files


def decide_replacement(old: tuple[str, dict], new: tuple[str, dict]) -> dict[str, Any]:
    """Whether the new run's model may replace the old one: its gate is configured and passed, and no metric got
    significantly worse in the paired comparison, and (with ``canary_records.max_changes``) its predictions on the
    canary records changed no more than allowed."""
    from safedl.decide.canary import canary_reasons, compare_canaries
    from safedl.decide.compare import compare_runs

    cmp = compare_runs([old, new])
    gate = new[1].get("gate") or {}
    reasons = []
    if not gate.get("configured", True):
        reasons.append("the new run's release gate sets no threshold (evaluation.gate): nothing was checked")
    elif not gate.get("passed"):
        reasons += [f"gate: {f}" for f in gate.get("failures", [])] or ["gate: failed"]
    reasons += [f"regression: {r}" for r in cmp["regressions"]]
    canaries = compare_canaries(old[1].get("canaries"), new[1].get("canaries"))
    reasons += canary_reasons(canaries)
    return {"replace": not reasons, "reasons": reasons, "comparison": cmp, "canaries": canaries}


def retrain(run_dir: str | Path, *, added: list[str | Path], device: str = "cpu",
            runs_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run the retraining; returns (new run dir, the decision written to its ``retrain.json``)."""
    from safedl.report.compare_report import write_comparison
    from safedl.report.render import load_results
    from safedl.run.pipeline import Run, run_assessment

    run_dir, added = Path(run_dir), [Path(p) for p in added]
    layout, files = _check_inputs(run_dir, added)
    profile = retrain_profile(load_profile(layout.profile), added)
    new_dir = Run.new_run_dir(profile, Path(runs_dir) if runs_dir is not None else run_dir.parent)
    new_dir, new_results = run_assessment(profile, base_dir=Path("."), run_dir=new_dir, device=device)
    runs = [(run_dir.name, load_results(layout.results)), (new_dir.name, new_results)]
    decision = decide_replacement(*runs)
    paths = write_comparison(decision["comparison"], runs, new_dir / "comparison")
    doc = {"from_run": str(run_dir.resolve()), "run": str(new_dir.resolve()), "added": files,
           "train_size": {"before": runs[0][1].get("data", {}).get("sizes", {}).get("train"),
                          "after": new_results.get("data", {}).get("sizes", {}).get("train")},
           "gate": new_results.get("gate"), "regressions": decision["comparison"]["regressions"],
           "canaries": decision["canaries"], "replace": decision["replace"], "reasons": decision["reasons"],
           "comparison": {k: str(v) for k, v in paths.items()}}
    atomic_write_json(new_dir / "retrain.json", doc)
    log.info("retrain: %s -> %s: %s", run_dir, new_dir, "may replace" if doc["replace"] else "keep the old one")
    return new_dir, doc
