"""Universal adversarial patch vs local gradient smoothing on a tiny CNN trained on digits (CPU, seeded): clean
accuracy, accuracy under the transferred patch (made on the undefended model) and under a patch trained through
LGS with BPDA (adaptive).

    PYTHONPATH=src python bench/measure_patch_defense.py --seed 1 --patch-fraction 0.15
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.adaptive import defended_model
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("measure_patch_defense")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--patch-fraction", type=float, default=0.15)
    ap.add_argument("--steps", type=int, default=150)
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
    x, y = splits.test.x, splits.test.y
    params = {"patch_fraction": args.patch_fraction, "steps": args.steps, "seed": args.seed}
    x_t = registry.create("evasion", "adversarial_patch", **params).fit(splits.train, model=model)(model, x, y)
    lgs = registry.create("preprocessor", "local_gradient_smoothing")
    deployed = defended_model([lgs], model, adaptive=False)
    x_a = registry.create("evasion", "adversarial_patch", **params).fit(
        splits.train, model=defended_model([lgs], model, adaptive=True))(model, x, y)
    n = len(y)
    acc = lambda m, v: proportion(int((predict(m, v) == y).sum()), n)  # noqa: E731
    log.info(json.dumps({"seed": args.seed, **params, "undefended_clean": acc(model, x),
                         "undefended_patched": acc(model, x_t), "lgs_clean": acc(deployed, x),
                         "lgs_transferred_patch": acc(deployed, x_t), "lgs_adaptive_patch": acc(deployed, x_a)}))


if __name__ == "__main__":
    main()
