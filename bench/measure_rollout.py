"""How often the default rollout checks promote a good canary and roll a degraded one back: digits, tiny_cnn
(tests/_rollout_helpers.py recipe: 6 epochs), stable = seed 0; per canary seed, a good canary (same recipe), a
backdoored one (10% of training stamped -> class 0) and one trained on shuffled labels, each checked once against
the stable version on the 600-image probe set (200 clean, 200 FGSM eps 0.15 made on stable, 200 triggered), the
way the controller's every evaluation is. Proportions with n and Wilson 95% intervals.

    PYTHONPATH=src nice -n 10 python bench/measure_rollout.py --seeds 2 3 4 5 6
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _rollout_helpers import bundle, probes_for, train  # noqa: E402
from safedl.data import load_builtin, stratified_split  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve.rollout.checks import evaluate, latencies, run_probes  # noqa: E402
from safedl.serve.rollout.config import Checks  # noqa: E402
from safedl.utils.progress import set_enabled  # noqa: E402
from safedl.utils.stats import proportion  # noqa: E402

KINDS = ("good", "backdoor", "shuffled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    args = ap.parse_args()
    set_enabled(False)
    torch.set_num_threads(1)
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    stable_model = train(splits, seed=0)
    ps = probes_for(stable_model, splits)
    tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    stable = load_bundle(bundle(stable_model, splits, tmp / "stable"))
    s_run = run_probes(stable.pipeline.decide, ps)
    modes = {"evidence": Checks(), "non_inferiority": Checks(mode="non_inferiority")}
    passed = {(m, k): 0 for m in modes for k in KINDS}
    decided_by: dict = {}
    for seed in args.seeds:
        for kind in KINDS:
            model = train(splits, seed=seed, labels={"good": "clean", "backdoor": "backdoor"}.get(kind, "shuffled"))
            cand = load_bundle(bundle(model, splits, tmp / f"{kind}-{seed}"))
            c_run = run_probes(cand.pipeline.decide, ps)
            lat = latencies({"stable": stable.pipeline.decide, "canary": cand.pipeline.decide}, ps)
            for m, cfg in modes.items():
                checks = evaluate(ps, s_run, c_run, lat, cfg=cfg)
                failed = [c["check"] for c in checks if not c["passed"]]
                passed[(m, kind)] += not failed
                decided_by.setdefault(f"{m}/{kind}", []).append({"seed": seed, "failed": failed})
    n = len(args.seeds)
    out = {f"{m}/{k}": {"promoted": proportion(passed[(m, k)], n)} for m in modes for k in KINDS}
    print(json.dumps({"seeds": args.seeds, "probes": ps.counts(), "results": out, "decided_by": decided_by},
                     indent=1))


if __name__ == "__main__":
    main()
