"""Measure the poisoning and backdoor attacks on mnist5k with the default small_cnn and the default TrainRecipe.

The baseline and every poisoned model train with the same recipe and seed (the stage handler's honest rule); the
numbers come from the same handler the CLI runs. Proportions are printed with n and a 95% Wilson interval.
``clean_label_no_pgd``, ``clean_label_one_corner`` and ``clean_label_no_eot`` are ablations of the clean-label
backdoor (what the PGD perturbation, the four-corner trigger and the shift-EOT each contribute).

    .venv/bin/python bench/measure_poisoning.py [--attacks static_patch learned_trigger clean_label label_flipping]
        [--seed 0] [--threads 1] [--baseline-cache /tmp/poison_bench_baseline.pt] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.run.handlers import get_attack_handler
from safedl.data import load_builtin, stratified_split
from safedl.models import build_model, with_normalization
from safedl.profile import AttackSpec, Profile
from safedl.utils.progress import set_enabled

# The measurement settings: (category, registry name, params).
CONFIGS = {
    "static_patch": ("backdoor", "static_patch",
                     {"trigger": "pattern", "patch_size": 3, "position": "bottom_right", "poison_fraction": 0.10,
                      "label_mode": "dirty", "target_class": 0}),
    "learned_trigger": ("backdoor", "learned_trigger", {"poison_fraction": 0.05, "patch_size_ratio": 0.1,
                                                     "position": "center", "target_class": 0}),
    "clean_label": ("poisoning", "label_consistent_backdoor",
                    {"class_fraction": 0.5, "eps": 0.3, "target_class": 0,
                     "all_corners": True, "eot_shift": 2}),
    # control: the same four-corner trigger on the same share of the target class, without the PGD perturbation
    "clean_label_no_pgd": ("poisoning", "label_consistent_backdoor",
                           {"class_fraction": 0.5, "eps": 0.0, "target_class": 0,
                            "all_corners": True}),
    # ablation: one corner only (shift-EOT PGD kept)
    "clean_label_one_corner": ("poisoning", "label_consistent_backdoor",
                               {"class_fraction": 0.5, "eps": 0.3, "target_class": 0,
                                "eot_shift": 2}),
    # ablation: four corners, plain PGD (no shift-EOT)
    "clean_label_no_eot": ("poisoning", "label_consistent_backdoor",
                           {"class_fraction": 0.5, "eps": 0.3, "target_class": 0,
                            "all_corners": True, "eot_shift": 0}),
    "label_flipping": ("poisoning", "label_flipping", {"strategy": "many_to_one", "flip_rate": 0.2, "target_class": 0}),
    "feature_collision": ("poisoning", "feature_collision",
                          {"target_class": 0, "source_class": 6}),
}


def fmt(m: dict | None) -> str:
    if m is None:
        return "-"
    if m.get("ci95") is None:
        return f"{m['value']:.4f}" + (f" (n={m['n']})" if m.get("n") is not None else "")
    lo, hi = m["ci95"]
    return f"{m['value']:.4f} [{lo:.4f}, {hi:.4f}] (n={m['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["static_patch", "learned_trigger", "clean_label", "label_flipping"],
                    choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-cache", default=None, help="reuse/save the baseline state_dict here")
    ap.add_argument("--json", default=None, help="also write every entry as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_enabled(False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=0)
    profile = Profile(seed=args.seed)  # default small_cnn, default TrainRecipe(), white-box threat model

    def fresh():
        return with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28),
                                  splits.mean, splits.std)

    run_dir = Path(tempfile.mkdtemp(prefix="poison_bench_"))
    ctx = RunContext(profile=profile, splits=splits, device=torch.device("cpu"), run_dir=run_dir, baseline=None,
                     build_fresh=fresh)  # type: ignore[arg-type]
    cache = Path(args.baseline_cache) if args.baseline_cache else None
    t0 = time.perf_counter()
    if cache is not None and cache.is_file():
        model = ctx.build_model()
        model.load_state_dict(torch.load(cache))
        ctx.baseline = model.eval()
        print(f"baseline: loaded from {cache}")
    else:
        ctx.baseline = ctx.train_like_baseline(splits.train, description="baseline")
        if cache is not None:
            torch.save(ctx.baseline.state_dict(), cache)
    print(f"mnist5k: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}; seed {args.seed}; "
          f"recipe {profile.training.model_dump()}; baseline {time.perf_counter() - t0:.0f}s")

    entries = []
    for key in args.attacks:
        cat, name, params = CONFIGS[key]
        spec = AttackSpec(name=name, id=key, params=params)
        attack = registry.create(cat, name, **params)
        t0 = time.perf_counter()
        outcome = get_attack_handler(cat)(ctx, spec, attack)
        e = outcome.entry
        entries.append(e)
        m = e["metrics"]
        print(f"\n== {key}: {name} {params}  ({time.perf_counter() - t0:.0f}s)")
        print(f"  clean_accuracy   baseline {fmt(m['baseline']['clean_accuracy'])}")
        print(f"                   poisoned {fmt(m['clean_accuracy'])}   drop {m['clean_accuracy_drop']['value']:+.4f}")
        for metric in ("attack_success_rate", "targeted_success_rate"):
            if metric in m:
                print(f"  {metric:<16} baseline {fmt(m['baseline'][metric])}")
                print(f"  {'':<16} poisoned {fmt(m[metric])}")
        pc = e["per_class"]
        print("  per-class accuracy drop: " + " ".join(
            f"{c}:{d:+.3f}" for c, d in enumerate(pc["accuracy_drop"]) if d is not None))
        print(f"  per_class_drop_max {fmt(m['per_class_drop_max'])}")
        print("  poison: " + ", ".join(f"{k} {fmt(v)}" for k, v in m["poison"].items()))
        print("  visibility: " + ", ".join(f"{k} {fmt(v)}" for k, v in m["visibility"].items()))
        for note in e["notes"]:
            print(f"  note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(entries, indent=1))
    print(f"\nartifacts under {run_dir}")


if __name__ == "__main__":
    main()
