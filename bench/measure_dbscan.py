"""DBSCAN cleanser on planted 2x2-patch backdoor poison (target 7) in 8x8 digits, tiny CNN, CPU, seeded.

    PYTHONPATH=src:tests python bench/measure_dbscan.py --seed 1 --fractions 0.03 0.1
"""
from __future__ import annotations

import argparse
import json
import logging

import torch
from sklearn.metrics import roc_auc_score

from _poison_planted import fit, plant_backdoor
from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.utils.stats import proportion

log = logging.getLogger("measure_dbscan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.03, 0.1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    for frac in args.fractions:
        p = plant_backdoor(splits.train, frac, seed=args.seed)
        res = registry.create("cleanser", "dbscan").find_poison(p, model=fit(splits, p, seed=args.seed))
        t, f = p.is_poison, res.is_suspect
        log.info(json.dumps({"seed": args.seed, "fraction": frac,
                             "tpr": proportion(int((f & t).sum()), int(t.sum())),
                             "fpr": proportion(int((f & ~t).sum()), int((~t).sum())),
                             "auroc": roc_auc_score(t.numpy(), res.score.numpy())}))


if __name__ == "__main__":
    main()
