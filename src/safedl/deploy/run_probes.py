"""A finished run's probe set for its bundle: up to ``n`` held-out test images, and up to ``n`` of each evasion
attack's stored adversarial examples and of each backdoor's triggered test inputs (from the attack stages'
saved state), sampled with ``seed``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safedl.data.packing import load_packed
from safedl.deploy.probes import ProbeSet, probe_set
from safedl.rundir import RunDir, attack_stage_name

log = logging.getLogger("safedl.deploy.probes")


def _attack_states(run_dir: Path, results: dict[str, Any]) -> list[tuple[str, dict]]:
    out = []
    for a in results.get("attacks", []):
        path = RunDir(run_dir).stage_state(attack_stage_name(str(a.get("id"))))
        if a.get("category") in ("evasion", "poisoning", "backdoor") and path.is_file():
            try:
                out.append((str(a.get("id")), load_packed(path)))
            except (OSError, RuntimeError, KeyError) as exc:  # a stage state that cannot be read adds no probes
                log.warning("probe set: %s unreadable (%s); its examples are left out", path, exc)
    return out


def probes_from_run(run_dir: str | Path, results: dict[str, Any], splits: Any, *, n: int = 200,
                    seed: int = 0) -> ProbeSet:
    """The probe set of the run at ``run_dir`` (``splits``: its reloaded splits; the clean probes come from the
    test split, which training and calibration never saw)."""
    adversarial, triggered = [], []
    for aid, state in _attack_states(Path(run_dir), results):
        if state.get("x_adv") is not None and state.get("y") is not None:
            adversarial.append((state["x_adv"], state["y"]))
        if state.get("test_triggered_x") is not None and state.get("test_triggered_aim") is not None:
            triggered.append((state["test_triggered_x"], state["test_triggered_y"], state["test_triggered_aim"]))
        log.debug("probe set: attack %s contributes its stored examples", aid)
    return probe_set(clean=(splits.test.x, splits.test.y), adversarial=adversarial, triggered=triggered, n=n,
                     seed=seed)
