"""CPU time of the strong adaptive suite (APGD-CE + APGD-DLR through BPDA) on feature squeezing, with and without
per-sample early stopping, and the success sets of both (they must be equal).

    nice -n 10 env PYTHONPATH=src python bench/bench_early_stop.py --n 200 --epochs 2 --seed 0

The model is small_cnn trained on mnist5k for --epochs epochs with the given seed; timings are process CPU seconds
(less sensitive than wall time to other jobs on a shared machine), alternating the two settings --repeats times.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite

from _setup import bench_setup, mnist5k_small_cnn

log = logging.getLogger("bench_early_stop")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    bench_setup()
    splits, model = mnist5k_small_cnn(args.seed, epochs=args.epochs)
    x, y = splits.test.x[:args.n], splits.test.y[:args.n]
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=1)
    times: dict[bool, list[float]] = {False: [], True: []}
    robust: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats):
        for stop in (False, True):
            t0 = time.process_time()
            res = strong_adaptive_suite(model, x, y, eps=args.eps, seed=args.seed, preprocessors=[squeeze],
                                        steps=args.steps, restarts=args.restarts, early_stop=stop)
            times[stop].append(time.process_time() - t0)
            robust[stop] = res.broken_by
    out = {"n": args.n, "seed": args.seed, "epochs": args.epochs, "steps": args.steps, "restarts": args.restarts,
           "cpu_s_full": statistics.median(times[False]), "cpu_s_early_stop": statistics.median(times[True]),
           "ratio": statistics.median(times[True]) / statistics.median(times[False]),
           "same_broken_by": bool(torch.equal(robust[False], robust[True])),
           "robust_accuracy": float((robust[True] == -1).float().mean())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
