"""Universal adversarial patch vs local gradient smoothing on a tiny CNN trained on digits (CPU, seeded): clean
accuracy, accuracy under the transferred patch (made on the undefended model) and under a patch trained through
LGS with BPDA (adaptive).

    PYTHONPATH=src python bench/measure_patch_defense.py --seed 1 --patch-fraction 0.15
"""
from __future__ import annotations

import argparse
import json
import logging

from safedl import registry
from safedl.defenses.adaptive import defended_model
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict

from _setup import bench_setup, digits_splits, trained_tiny_cnn

log = logging.getLogger("measure_patch_defense")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--patch-fraction", type=float, default=0.15)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    bench_setup()
    splits = digits_splits(args.seed)
    model = trained_tiny_cnn(splits, args.seed)
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
