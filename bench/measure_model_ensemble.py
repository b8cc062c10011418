"""model_ensemble (3 seeds, softmax averaged) on digits, tiny CNN, CPU, seeded: PGD on the whole ensemble
(adaptive) vs PGD transferred from one member, judged on the ensemble.

    PYTHONPATH=src python bench/measure_model_ensemble.py --seed 1 --eps 0.15
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("measure_model_ensemble")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--members", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    seed_everything(args.seed)
    fresh = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               splits.mean, splits.std)
    ens = registry.create("trainer", "model_ensemble", members=args.members).fit(
        fresh, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"), seed=args.seed)
    x, y = splits.test.x, splits.test.y
    pgd = registry.create("evasion", "pgd", eps=args.eps, steps=20, seed=args.seed)
    n = len(y)
    acc = lambda v: proportion(int((predict(ens, v) == y).sum()), n)  # noqa: E731
    log.info(json.dumps({"seed": args.seed, "eps": args.eps, "members": args.members, "clean": acc(x),
                         "transfer_from_member_0": acc(pgd(ens.members[0], x, y)),
                         "adaptive_on_ensemble": acc(pgd(ens, x, y))}))


if __name__ == "__main__":
    main()
