"""Issue 30 part C numbers on digits (8x8, tiny_cnn, 15 epochs, lr 3e-3; split seed 0): inject (scratch and
fine-tune), hidden-trigger (fine-tune) and IBP (standard vs IBP training, verified vs PGD-20 robust accuracy).

    PYTHONPATH=src python bench/measure_poison_families.py --seeds 0 1 2 [--parts inject hidden ibp]

``--seeds`` sets the model/attack seed (the baseline's initialisation and training order, the attack's draws);
defaults were picked on seed 0. Every proportion is printed with its n and 95% Wilson interval.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.evaluate.context import RunContext
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.profile import AttackSpec, Profile
from safedl.run.handlers import get_attack_handler
from safedl.utils.progress import set_enabled
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("bench")
RECIPE = dict(epochs=15, batch_size=64, lr=3e-3, augment="none")
FINETUNE = {"epochs": 10, "lr": 1e-3}


def _fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}] (n={m['n']})"


def _setup(seed: int):
    splits = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)

    def fresh():
        return with_normalization(build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8),
                                  splits.mean, splits.std)

    seed_everything(seed)
    base = fresh()
    train_model(base, splits.train, recipe=TrainRecipe(**RECIPE), seed=seed)
    return splits, fresh, base.eval()


def _crosses(folder: Path, n: int, seed: int) -> None:
    """``n`` noisy 8x8 crosses (an object that is none of the digits), as PNG files."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(8, 8)
    idx = torch.arange(8)
    base[idx, idx] = base[idx, 7 - idx] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = (base + 0.15 * torch.randn(8, 8, generator=g)).clamp(0, 1)
        Image.fromarray((img.numpy() * 255).round().astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")


def _attack(splits, fresh, base, seed, cat, name, params, mode, tmp):
    recipe = TrainRecipe(**RECIPE, mode=mode, finetune=FINETUNE)
    ctx = RunContext(profile=Profile(seed=seed, training=recipe, threat_model={"model_access": "white-box"}),
                     splits=splits, device=torch.device("cpu"), run_dir=tmp, baseline=base, build_fresh=fresh)
    out = get_attack_handler(cat)(ctx, AttackSpec(name=name, params=params), registry.create(cat, name, **params))
    m = out.entry["metrics"]
    print(f"seed {seed} {name} mode={mode}: attack_success_rate {_fmt(m['attack_success_rate'])}, clean model "
          f"{_fmt(m['baseline']['attack_success_rate'])}; clean accuracy {_fmt(m['clean_accuracy'])} "
          f"(baseline {_fmt(m['baseline']['clean_accuracy'])})", flush=True)


def _ibp(splits, fresh, base, seed, eps=0.05):
    x, y = splits.test.x, splits.test.y
    seed_everything(seed)
    model = fresh()
    trained = registry.create("trainer", "ibp", eps=1.1 * eps).fit(model, splits.train, recipe=TrainRecipe(**RECIPE),
                                                                  seed=seed)
    cert = registry.create("certifier", "ibp", eps=eps)
    pgd = registry.create("evasion", "pgd", eps=eps, steps=20, seed=seed)
    for name, m in (("standard", base), ("ibp", trained)):
        ver = int(cert.with_model(m).certify(x, y).sum())
        rob = int((predict(m, pgd(m, x, y)) == y).sum())
        clean = int((predict(m, x) == y).sum())
        print(f"seed {seed} {name} training, eps {eps}: clean {_fmt(proportion(clean, len(y)))}, PGD-20 robust "
              f"{_fmt(proportion(rob, len(y)))}, IBP verified {_fmt(proportion(ver, len(y)))}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--parts", nargs="+", default=["inject", "hidden", "ibp"], choices=["inject", "hidden", "ibp"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_enabled(False)
    torch.set_num_threads(1)
    for seed in args.seeds:
        splits, fresh, base = _setup(seed)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if "inject" in args.parts:
                _crosses(tmp / "crosses", 40, seed)
                params = {"path": str(tmp / "crosses"), "target_class": 7, "n": 25, "holdout_fraction": 0.25}
                for mode in ("scratch", "finetune"):
                    _attack(splits, fresh, base, seed, "poisoning", "inject", params, mode, tmp)
            if "hidden" in args.parts:
                for eps, n in ((0.1, 50), (0.2, 80)):
                    params = {"target_class": 0, "source_class": 1, "n_poisons": n, "eps": eps, "patch_size": 3,
                              "steps": 100, "seed": seed}
                    _attack(splits, fresh, base, seed, "backdoor", "hidden_trigger", params, "finetune", tmp)
            if "ibp" in args.parts:
                _ibp(splits, fresh, base, seed)


if __name__ == "__main__":
    main()
