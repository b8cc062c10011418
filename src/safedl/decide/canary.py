"""Canary check: which canary records (see ``evaluate/canary.py``) a retrained model predicts differently from the
model it would replace; a pure function of the two runs' results.json ``canaries`` entries."""
from __future__ import annotations

from typing import Any


def compare_canaries(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """The prediction changes from ``old`` to ``new`` (None when either run stored no canaries). ``passed`` is
    None unless the new run's profile sets ``canary_records.max_changes``."""
    if not old or not new:
        return None
    max_changes = new.get("max_changes")
    if old.get("images_sha256") != new.get("images_sha256"):
        return {"comparable": False, "n": new.get("n"), "max_changes": max_changes, "passed": None if max_changes is
                None else False, "reason": "the two runs' canary records differ (other images or labels)"}
    labels, before, after = new["labels"], old["predictions"], new["predictions"]
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    broken = [i for i in changed if before[i] == labels[i]]
    return {"comparable": True, "n": len(labels), "changed": len(changed), "changed_indices": changed,
            "broken": len(broken), "broken_indices": broken,
            "changes": [{"index": i, "label": labels[i], "before": before[i], "after": after[i]} for i in changed],
            "max_changes": max_changes, "passed": None if max_changes is None else len(changed) <= max_changes}


def canary_reasons(check: dict[str, Any] | None) -> list[str]:
    """Why the canary check blocks a replacement (empty when it passed or is not configured)."""
    if not check or check.get("passed") is not False:
        return []
    if not check.get("comparable"):
        return [f"canary: {check['reason']}"]
    return [f"canary: {check['changed']} of {check['n']} canary records changed prediction ({check['broken']} that "
            f"were right are now wrong); canary_records.max_changes is {check['max_changes']}"]
