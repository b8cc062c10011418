"""ART's clean-label backdoor through the adapter (``art:PoisoningAttackCleanLabelBackdoor``) on digits with a tiny CNN
(CPU, seeded): the poisoned model's clean accuracy and attack success rate (triggered non-target test images sent
to the target) next to the clean model's, and each model-based cleanser's TPR / FPR against the exact ground truth.

    PYTHONPATH=src python bench/measure_art_clean_label.py --seed 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import RECIPE, bench_setup, digits_splits, fresh_tiny_cnn, trained_tiny_cnn  # noqa: E402

from safedl import registry  # noqa: E402
from safedl.models import train_model  # noqa: E402
from safedl.utils.stats import proportion  # noqa: E402
from safedl.utils.tensors import predict  # noqa: E402

PARAMS = {"target_class": 0, "pp_poison": 0.9, "eps": 0.2, "eps_step": 0.05, "max_iter": 10,
          "perturbation_params": {"distance": 1}}
CLEANSERS = (("spectral_signatures", True), ("activation_clustering", True), ("anomaly_detection", False),
             ("dbscan", False), ("influence_functions", True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bench_setup()
    splits = digits_splits(args.seed)
    clean = trained_tiny_cnn(splits, args.seed)
    attack = registry.create("backdoor", "art:PoisoningAttackCleanLabelBackdoor", seed=args.seed, **PARAMS)
    attack.fit(splits.train, surrogate=clean)
    data = attack.poison(splits.train, generator=torch.Generator().manual_seed(args.seed))
    model = fresh_tiny_cnn(splits, args.seed)
    train_model(model, data, recipe=RECIPE, seed=args.seed)
    model.eval()
    x = splits.test.x[splits.test.y != PARAMS["target_class"]]
    xt = attack.apply_trigger(x)
    out: dict = {"seed": args.seed, "params": PARAMS, "n_poison": int(data.n_poison),
                 "target_class_size": int((splits.train.y == PARAMS["target_class"]).sum())}
    for name, m in (("clean", clean), ("poisoned", model)):
        out[name] = {"clean_accuracy": proportion(int((predict(m, splits.test.x) == splits.test.y).sum()),
                                                  len(splits.test.y)),
                     "attack_success_rate": proportion(int((predict(m, xt) == PARAMS["target_class"]).sum()), len(x))}
    for name, trusted in CLEANSERS:
        flagged = registry.create("cleanser", name).find_poison(
            data, model=model, **({"trusted": splits.val} if trusted else {})).is_suspect
        out[name] = {"tpr": proportion(int(flagged[data.is_poison].sum()), int(data.is_poison.sum())),
                     "fpr": proportion(int(flagged[~data.is_poison].sum()), int((~data.is_poison).sum()))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
