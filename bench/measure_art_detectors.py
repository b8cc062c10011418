"""ART's binary detectors through the adapter (``art:BinaryInputDetector``, ``art:BinaryActivationDetector``, their
defaults: fit on PGD-20 at eps 0.1, 1000 clean + 1000 adversarial images, 20 ART epochs) on a tiny CNN trained on
digits (CPU, seeded): AUROC and TPR (at the threshold set on clean validation for 5% FPR) on FGSM and PGD-10 test
examples at L-inf 0.1, the clean test FPR, and the share of test images that fool the classifier unflagged, for
PGD-10 (non-adaptive) and the detector-aware PGD-40 (adaptive).

    PYTHONPATH=src python bench/measure_art_detectors.py --seed 1
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import bench_setup, digits_splits, trained_tiny_cnn  # noqa: E402

from safedl import registry  # noqa: E402
from safedl.defenses.adaptive import DetectorAwarePGD  # noqa: E402
from safedl.utils.stats import auroc, proportion  # noqa: E402
from safedl.utils.tensors import predict  # noqa: E402

log = logging.getLogger("measure_art_detectors")
NAMES = ("art:BinaryInputDetector", "art:BinaryActivationDetector")


def measure(name: str, model: torch.nn.Module, splits, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> dict:
    det = registry.create("detector", name).fit(splits.train.x, model=model, y=splits.train.y,
                                                x_calibration=splits.val.x, seed=seed)
    out: dict = {"fit_accuracy": det.fit_accuracy_, "fpr": proportion(int(det.predict(x).sum()), len(x))}
    examples = {"fgsm": registry.create("evasion", "fgsm", eps=eps)(model, x, y),
                "pgd": registry.create("evasion", "pgd", eps=eps, steps=10, seed=seed)(model, x, y)}
    for attack, xa in examples.items():
        out[attack] = {"auroc": auroc(det.score(x), det.score(xa)),
                       "tpr": proportion(int(det.predict(xa).sum()), len(xa))}
    x_ad = DetectorAwarePGD(eps=eps, steps=40, seed=seed)(model, [det], x, y)
    for label, xa in (("nonadaptive_pgd", examples["pgd"]), ("adaptive_detector_aware_pgd", x_ad)):
        evade = (predict(model, xa) != y) & ~det.predict(xa)
        out[f"fooled_unflagged_{label}"] = proportion(int(evade.sum()), len(y))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=300, help="test images")
    args = ap.parse_args()
    bench_setup()
    splits = digits_splits(args.seed)
    model = trained_tiny_cnn(splits, args.seed)
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]
    results = {name: measure(name, model, splits, x, y, args.eps, args.seed) for name in NAMES}
    print(json.dumps({"seed": args.seed, "eps": args.eps, "n": len(y), "results": results}, indent=1))


if __name__ == "__main__":
    main()
