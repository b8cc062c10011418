"""cProfile of the strong adaptive suite (APGD-CE + APGD-DLR through BPDA) on feature squeezing: where its time goes.

    nice -n 10 env PYTHONPATH=src python bench/profile_strong_suite.py --n 20 --epochs 1 --seed 0

small_cnn trained on mnist5k for --epochs epochs with --seed; bit depth 1, eps 0.3 L-inf, 100 steps x 3 restarts,
1 torch thread. Prints the process CPU seconds, the suite's robust accuracy and the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import time

from safedl import registry
from safedl.defenses.adaptive import strong_adaptive_suite

from _setup import bench_setup, mnist5k_small_cnn

log = logging.getLogger("profile_strong_suite")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    bench_setup()
    splits, model = mnist5k_small_cnn(args.seed, epochs=args.epochs)
    x, y = splits.test.x[:args.n], splits.test.y[:args.n]
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=1)
    c0, prof = time.process_time(), cProfile.Profile()
    prof.enable()
    res = strong_adaptive_suite(model, x, y, eps=0.3, preprocessors=[squeeze], steps=100, restarts=3, seed=args.seed)
    prof.disable()
    log.info("CPU %.1f s; robust accuracy %s; broken by %s", time.process_time() - c0, res.robust_accuracy(),
             {m: int((res.broken_by == i).sum()) for i, m in enumerate(res.members)})
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    log.info("%s", out.getvalue())


if __name__ == "__main__":
    main()
