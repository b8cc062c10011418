"""Results assembly: results.json from the baseline and stage entries, with the risk rating and the release gate
(``safedl.decide``) computed from them."""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch

import safedl
from safedl.data.dataset import Splits
from safedl.decide.chance import fail_on_chance
from safedl.decide.gate import evaluate_gate, fail_on_failed_stages
from safedl.decide.risk import assess_risk
from safedl.executors import Executor
from safedl.profile import Profile

SCHEMA_VERSION = 1


def assemble_results(profile: Profile, *, run_id: str, device: torch.device, executor: Executor,
                     data_info: dict[str, Any], baseline_entry: dict[str, Any], attacks: list[dict],
                     defenses: list[dict], failed: list[dict]) -> dict[str, Any]:
    """results.json: the run's record, its risk rating and its gate outcome."""
    p = profile
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": p.model_dump(mode="json"),
        "environment": environment(device, p.seed),
        "execution": dict(zip(("executor", "workers", "threads_per_task"), (executor.name, *executor.resolved()))),
        "data": data_info,
        "baseline": baseline_entry,
        "attacks": attacks,
        "defenses": defenses,
        "failed_stages": failed,
    }
    results["risk"] = assess_risk(p.threat_model, attacks, defenses,
                                  baseline_accuracy=baseline_entry["metrics"]["clean_accuracy"]["value"])
    results["gate"] = fail_on_chance(fail_on_failed_stages(evaluate_gate(p.evaluation.gate, results), failed), results)
    return results


def data_summary(profile: Profile, splits: Splits) -> dict[str, Any]:
    """results.json "data": the data set's name, where it came from, its class names, shape, sizes and hashes."""
    names = splits.train.class_names or [str(i) for i in range(splits.num_classes)]
    return {"name": splits.train.name, "format": profile.dataset.format, "path": profile.dataset.path,
            "class_names": list(names), "shape": list(splits.shape), "num_classes": splits.num_classes,
            "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
            "class_counts": {"train": splits.train.class_counts(), "test": splits.test.class_counts()},
            "hashes": splits.hashes()}


def environment(device: torch.device, seed: int) -> dict[str, Any]:
    import numpy
    import sklearn

    return {"safedl": safedl.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "platform": platform.platform(),
            "device": str(device), "threads": torch.get_num_threads(), "seed": seed}

