"""MagNet detector vs PGD (L-inf 0.3) on a tiny CNN trained on digits (CPU, seeded): AUROC, TPR at the threshold
set on clean validation for 5% FPR, the clean test FPR, and the same after the detector-aware PGD (adaptive).

    PYTHONPATH=src python bench/measure_magnet.py --seed 1
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.adaptive import DetectorAwarePGD
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import auroc, proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("measure_magnet")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    seed_everything(args.seed)
    model = with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                               splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                seed=args.seed)
    model.eval()
    det = registry.create("detector", "magnet", fpr=0.05).fit(splits.train.x, model=model,
                                                             x_calibration=splits.val.x, seed=args.seed)
    x, y = splits.test.x, splits.test.y
    x_pgd = registry.create("evasion", "pgd", eps=args.eps, steps=20, seed=args.seed)(model, x, y)
    x_ad = DetectorAwarePGD(eps=args.eps, steps=40, seed=args.seed)(model, [det], x, y)
    n = len(y)
    evaded = (predict(model, x_ad) != y) & ~det.predict(x_ad)
    log.info(json.dumps({"seed": args.seed, "eps": args.eps,
                         "clean_fpr": proportion(int(det.predict(x).sum()), n),
                         "auroc_pgd": auroc(det.score(x), det.score(x_pgd)),
                         "tpr_pgd": proportion(int(det.predict(x_pgd).sum()), n),
                         "tpr_adaptive": proportion(int(det.predict(x_ad).sum()), n),
                         "adaptive_fooled_and_undetected": proportion(int(evaded.sum()), n)}))


if __name__ == "__main__":
    main()
