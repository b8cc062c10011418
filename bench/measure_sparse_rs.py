"""Sparse-RS vs random k-pixel noise with the same query budget, on a tiny CNN trained on digits (CPU, seeded).

    PYTHONPATH=src python bench/measure_sparse_rs.py --seed 1 --k 4 --queries 100
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from safedl import registry
from safedl.attacks.evasion.sparse_rs import random_pixel_values, random_subset
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict

from _setup import bench_setup, digits_splits, trained_tiny_cnn

log = logging.getLogger("measure_sparse_rs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    bench_setup()
    splits = digits_splits(args.seed)
    model = trained_tiny_cnn(splits, args.seed)
    x, y = splits.test.x, splits.test.y
    ok = predict(model, x) == y
    x, y = x[ok], y[ok]
    attack = registry.create("evasion", "sparse_rs", k=args.k, max_queries=args.queries, seed=args.seed)
    srs = predict(model, attack(model, x, y)) != y
    gen = torch.Generator().manual_seed(args.seed)
    n, c, h, w = x.shape
    base = torch.zeros(n, dtype=torch.bool)
    for _ in range(args.queries):
        pos = random_subset(torch.ones(n, h * w, dtype=torch.bool), args.k, gen)
        adv = x.flatten(2).clone()
        adv.scatter_(2, pos.unsqueeze(1).expand(n, c, args.k), random_pixel_values(n, c, args.k, gen, x))
        base |= predict(model, adv.view_as(x)) != y
    out = {"seed": args.seed, "k": args.k, "queries": args.queries,
           "sparse_rs_success": proportion(int(srs.sum()), n), "random_k_success": proportion(int(base.sum()), n),
           "sparse_rs_queries_median": float(attack.queries_.float().median())}
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
