"""model_ensemble (3 seeds, softmax averaged) on digits, tiny CNN, CPU, seeded: PGD on the whole ensemble
(adaptive) vs PGD transferred from one member, judged on the ensemble.

    PYTHONPATH=src python bench/measure_model_ensemble.py --seed 1 --eps 0.15
"""
from __future__ import annotations

import argparse
import json
import logging

from safedl import registry
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict

from _setup import RECIPE, bench_setup, digits_splits, fresh_tiny_cnn

log = logging.getLogger("measure_model_ensemble")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--members", type=int, default=3)
    args = ap.parse_args()
    bench_setup()
    splits = digits_splits(args.seed)
    ens = registry.create("trainer", "model_ensemble", members=args.members).fit(
        fresh_tiny_cnn(splits, args.seed), splits.train, recipe=RECIPE, seed=args.seed)
    x, y = splits.test.x, splits.test.y
    pgd = registry.create("evasion", "pgd", eps=args.eps, steps=20, seed=args.seed)
    n = len(y)
    acc = lambda v: proportion(int((predict(ens, v) == y).sum()), n)  # noqa: E731
    log.info(json.dumps({"seed": args.seed, "eps": args.eps, "members": args.members, "clean": acc(x),
                         "transfer_from_member_0": acc(pgd(ens.members[0], x, y)),
                         "adaptive_on_ensemble": acc(pgd(ens, x, y))}))


if __name__ == "__main__":
    main()
