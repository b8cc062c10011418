"""The rollout's live Square probes (serve/rollout/live.py) on the digits test models of tests/_rollout_helpers.py:
robust accuracy of the labels-only stable pipeline, the same model with that defense removed, and a second seed
with it, on one seeded subset of clean probes, each with n and a 95% Wilson interval; and the paired one-sided 95%
bound of stable - candidate that ``live_robust_accuracy_drop`` compares with its limit.

    PYTHONPATH=src:tests python bench/measure_rollout_live.py --seed 0 --n 40 --queries 60 --eps 0.15
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from _rollout_helpers import bundle, probes_for, train
from safedl.data import load_builtin, stratified_split
from safedl.decide.paired import paired_difference
from safedl.deploy import load_bundle
from safedl.serve.rollout.live import live_robust, live_subset
from safedl.utils.stats import wilson_interval

log = logging.getLogger("bench.rollout_live")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="the probe subset's and the attack's seed")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--eps", type=float, default=0.15)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)
    stable = train(splits, seed=0)
    ps = probes_for(stable, splits)
    idx = live_subset(ps, n=a.n, seed=a.seed)
    kw = {"eps": a.eps, "queries_per_image": a.queries, "seed": a.seed}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"stable (labels only)": bundle(stable, splits, Path(tmp) / "s", postprocessors=("class_labels",)),
                 "defense removed": bundle(stable, splits, Path(tmp) / "u"),
                 "seed 1, labels only": bundle(train(splits, seed=1), splits, Path(tmp) / "g",
                                               postprocessors=("class_labels",))}
        robust = {k: live_robust(load_bundle(p).pipeline.decide, ps, idx, **kw)[0] for k, p in paths.items()}
    ref = robust["stable (labels only)"]
    for name, r in robust.items():
        k, n = int(r.sum()), len(r)
        lo, hi = wilson_interval(k, n)
        d = paired_difference(ref, r)
        log.info("%-22s live robust accuracy %d/%d = %.3f (95%% CI %.3f-%.3f); stable - it = %.3f, one-sided 95%% "
                 "bounds [%.3f, %.3f]", name, k, n, k / n, lo, hi, d["value"], d["lower"], d["upper"])


if __name__ == "__main__":
    main()
