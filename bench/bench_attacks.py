"""Gradient-attack speed (issue 3): each attack's time in units of one forward+backward-to-input pass of the same
batch, divided by its number of gradient steps (target <= 1.15), and, when ART is installed, ART's time for the same
attack on the same model and images.

Model: the default mnist5k ``small_cnn`` trained with ``TrainRecipe()`` defaults on
``stratified_split(load_builtin('mnist5k'), test_fraction=0.2, val_fraction=0.1, seed=0)`` (cached under /tmp).
Both wall and process CPU time are printed; on a shared machine the CPU-time ratio is the steadier one.

    .venv/bin/python bench/bench_attacks.py [--n 256] [--repeats 3] [--threads 1] [--no-art]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_evasion import default_model  # noqa: E402

from safedl import registry  # noqa: E402
from safedl.utils.progress import set_enabled  # noqa: E402
from safedl.utils.tensors import eval_mode, frozen_params  # noqa: E402

# (label, registry name, params, gradient steps the attack takes)
ATTACKS = [
    ("fgsm", "fgsm", {"eps": 0.3}, 1),
    ("pgd-20", "pgd", {"eps": 0.3, "steps": 20}, 20),
    ("apgd_ce-20", "apgd_ce", {"eps": 0.3, "steps": 20}, 20),
    ("apgd_dlr-20", "apgd_dlr", {"eps": 0.3, "steps": 20}, 20),
    ("cw_l2 1x20", "cw_l2", {"binary_search_steps": 1, "steps": 20, "abort_early": False}, 20),
    ("deepfool-l2", "deepfool", {"norm": "l2", "steps": 50}, None),  # data-dependent: reported in passes only
]


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``fn()`` over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def art_attacks(model, n: int):
    try:
        from art.attacks.evasion import (AutoProjectedGradientDescent, CarliniL2Method, DeepFool, FastGradientMethod,
                                         ProjectedGradientDescent)
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return {}
    logging.getLogger("art").setLevel(logging.ERROR)
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    return {
        "fgsm": FastGradientMethod(clf, eps=0.3, batch_size=n),
        "pgd-20": ProjectedGradientDescent(clf, eps=0.3, eps_step=2.5 * 0.3 / 20, max_iter=20, batch_size=n,
                                           verbose=False),
        "apgd_ce-20": AutoProjectedGradientDescent(clf, eps=0.3, eps_step=0.6, max_iter=20, nb_random_init=1,
                                                   batch_size=n, loss_type="cross_entropy", verbose=False),
        "apgd_dlr-20": AutoProjectedGradientDescent(clf, eps=0.3, eps_step=0.6, max_iter=20, nb_random_init=1,
                                                    batch_size=n, loss_type="difference_logits_ratio",
                                                    verbose=False),
        "cw_l2 1x20": CarliniL2Method(clf, binary_search_steps=1, max_iter=20, batch_size=n, verbose=False),
        "deepfool-l2": DeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=n, verbose=False),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-art", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_enabled(False)
    model, splits = default_model(args.seed)
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]

    def fwd_bwd():
        with eval_mode(model), frozen_params(model):
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)

    fwd_bwd()  # warm-up
    fb_wall, fb_cpu = timed(fwd_bwd, max(5, args.repeats * 3))
    print(f"mnist5k small_cnn seed={args.seed} batch n={len(x)} threads={args.threads}: one forward+backward "
          f"= {fb_wall * 1e3:.1f} ms wall, {fb_cpu * 1e3:.1f} ms cpu")
    art = {} if args.no_art else art_attacks(model, len(x))
    print(f"{'attack':<14}{'wall s':>9}{'passes':>9}{'/step':>8}{'cpu /step':>11}{'ART wall s':>12}{'ART/ours':>10}")
    for label, name, params, steps in ATTACKS:
        attack = registry.create("evasion", name, **params)
        wall, cpu = timed(lambda: attack(model, x, y), args.repeats)
        per = "" if steps is None else f"{wall / fb_wall / steps:8.3f}{cpu / fb_cpu / steps:11.3f}"
        line = f"{label:<14}{wall:9.3f}{wall / fb_wall:9.1f}" + (per or f"{'-':>8}{'-':>11}")
        if label in art:
            xn, yn = x.numpy(), y.numpy()
            gen = (lambda a=art[label]: a.generate(xn)) if label == "deepfool-l2" else \
                (lambda a=art[label]: a.generate(xn, yn))
            a_wall, _ = timed(gen, 1)
            line += f"{a_wall:12.3f}{a_wall / wall:10.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
