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
from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("measure_sparse_rs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    seed_everything(args.seed)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                seed=args.seed)
    model.eval()
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
