"""CPU time of the feature-squeezing detector's score (Xu et al., NDSS 2018) on one image, batched (one forward
pass of the raw, bit-depth and median inputs, the detector's code) against the three separate passes it replaced,
interleaved in one process with 1 torch thread (``small_cnn`` 1 x 28 x 28, untrained: the cost does not depend
on the weights). Reports the median over ``--rounds`` of the per-call CPU ms (time.process_time).

    PYTHONPATH=src nice -n 10 /work/main/.venv/bin/python bench/bench_fs_detector.py --rounds 5 --calls 500 --seed 0
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from safedl.defenses.adaptive import bpda
from safedl.defenses.detect.feature_squeezing_detector import FeatureSqueezingDetector
from safedl.defenses.preprocess.feature_squeezing import FeatureSqueezing
from safedl.defenses.preprocess.spatial_smoothing import median_filter
from safedl.models import build_model


def three_passes(det: FeatureSqueezingDetector, x: torch.Tensor) -> torch.Tensor:
    """The score as three forward passes (the code before the batched one)."""
    m = det.model_
    p = m(x).softmax(1)
    p_bits = m(bpda(FeatureSqueezing(bit_depth=det.bit_depth), None, x)).softmax(1)
    p_med = m(median_filter(x, det.window)).softmax(1)
    return torch.maximum((p - p_bits).abs().sum(1), (p - p_med).abs().sum(1))

from _setup import cpu_ms_per_call as _cpu_ms


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_model("small_cnn", in_channels=1, num_classes=10, image_size=28).eval()
    det = FeatureSqueezingDetector(bit_depth=2, window=2)
    det.model_ = model
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    old, new = [], []
    with torch.no_grad():
        for _ in range(args.rounds):
            old.append(_cpu_ms(lambda: three_passes(det, x), args.calls))
            new.append(_cpu_ms(lambda: det.score_torch(x), args.calls))
    out = {"seed": args.seed, "rounds": args.rounds, "calls": args.calls,
           "three_passes_cpu_ms": round(statistics.median(old), 3), "batched_cpu_ms": round(statistics.median(new), 3),
           "speedup": round(statistics.median(old) / statistics.median(new), 3),
           "per_round": {"three_passes": [round(v, 3) for v in old], "batched": [round(v, 3) for v in new]}}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
