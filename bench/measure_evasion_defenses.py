"""Measure the evasion defenses of issue 6 on mnist5k (small_cnn, TrainRecipe() defaults, L-inf eps 0.3, seed 0).

    .venv/bin/python bench/measure_evasion_defenses.py [--parts at,preprocess,detect,smoothing,post] [--n 500]

Parts: ``at`` PGD adversarial training vs the ``ensemble`` attack (PGD-40 x restarts when no ensemble is
registered); ``preprocess`` non-adaptive vs adaptive (BPDA/EOT) robust accuracy of feature squeezing, spatial
smoothing, JPEG; ``detect`` lid and mahalanobis TPR at 5% FPR on non-adaptive PGD and on detector-aware PGD;
``smoothing`` randomized smoothing (sigma 0.5) certified accuracy at L2 radii 0.5/1.0/1.5; ``post`` output
postprocessors against score-based ``square`` / ``transfer`` when those attacks are registered.
Every number prints with its n and 95% Wilson interval.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.adaptive import DetectorAwarePGD, defended_model
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

SEED = 0
EPS = 0.3
log = logging.getLogger("bench")


def fmt(name: str, k: int, n: int) -> str:
    m = proportion(k, n)
    return f"{name}: {m['value']:.3f} (n={n}, 95% CI [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}])"


def fresh(splits):
    seed_everything(SEED)
    net = build_model("small_cnn", in_channels=1, num_classes=10, image_size=28)
    return with_normalization(net, splits.mean, splits.std)


def baseline(splits):
    model = fresh(splits)
    t0 = time.perf_counter()
    train_model(model, splits.train, recipe=TrainRecipe(), seed=SEED, val=splits.val)
    print(f"baseline trained in {time.perf_counter() - t0:.0f}s")
    return model.eval()


def strongest_attack():
    """The ensemble attack when registered, else PGD-40 with 5 random restarts."""
    if "ensemble" in registry.names("evasion"):
        return "ensemble", registry.create("evasion", "ensemble", eps=EPS)
    return "pgd-40x5 (no ensemble registered)", registry.create("evasion", "pgd", eps=EPS, steps=40, restarts=5, seed=SEED)


def batched(fn, x, y, bs=250):
    return torch.cat([fn(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])


def part_at(splits, n):
    trainer = registry.create("trainer", "adversarial_training", attack="pgd", eps=EPS, steps=5, ratio=1.0)
    model = fresh(splits)
    cpu0 = time.process_time()
    trainer.fit(model, splits.train, recipe=TrainRecipe(), seed=SEED, val=splits.val)
    cpu_s = time.process_time() - cpu0
    x, y = splits.test.x, splits.test.y
    clean = predict(model, x) == y
    print(f"[at] adversarial_training(pgd-5, eps {EPS}, ratio 1) trained in {trainer.time_s_:.0f}s wall, {cpu_s:.0f}s CPU "
          f"on {torch.get_num_threads()} thread(s) of a shared machine, {len(splits.train)} train images, recipe TrainRecipe() (seed {SEED})")
    print("[at] " + fmt("clean_accuracy", int(clean.sum()), len(y)))
    name, attack = strongest_attack()
    xs, ys = x[:n], y[:n]
    t0 = time.perf_counter()
    x_adv = batched(lambda a, b: attack(model, a, b), xs, ys)
    rob = (predict(model, x_adv) == ys) & clean[:n]
    print(f"[at] " + fmt(f"robust_accuracy vs {name} eps {EPS}", int(rob.sum()), n) + f" ({time.perf_counter() - t0:.0f}s)")
    torch.save(model.state_dict(), "/tmp/edef_at_model.pt")
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="at,preprocess,detect,smoothing,post")
    ap.add_argument("--n", type=int, default=500, help="test images per evaluation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("safedl.models.train").setLevel(logging.DEBUG)  # per-epoch loss / val accuracy
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=SEED)
    print(f"mnist5k: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, seed {SEED}")
    parts = args.parts.split(",")
    base = None
    for part in parts:
        if part == "at":
            part_at(splits, args.n)
            continue
        if base is None:
            base = baseline(splits)
        globals()[f"part_{part}"](splits, base, args.n)


if __name__ == "__main__":
    main()
