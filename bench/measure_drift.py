"""Issue 24, drift: false alarms and detection delay of the service's drift tests (serve/monitor/drift.py).

The model is the data set's default CNN trained with the default recipe (``small_cnn`` on mnist5k, ``tiny_cnn`` on
digits; ``--epochs`` overrides its 8 epochs; cached under /tmp per data set, seed and epochs). The reference is what ``safedl export`` stores (the validation
split's penultimate features and predicted labels, ``compute_reference``); the held-out clean data is the test
split, never seen by training or the reference. Per window of ``--window`` images the two tests of the service run
exactly as there (``MMDPermutationTest`` with ``--permutations``, ``chi2_homogeneity``); an alarm is p <= 0.005 in
either test (the default rules' threshold).

- False alarms: ``--windows`` windows, each ``--window`` test images drawn without replacement (a fresh draw per
  window), alarms counted per test and for either; 95% Wilson intervals.
- Detection delay: the stream switches to shifted test images at a uniformly random position inside a window (the
  window then holds that many clean images first); the delay is the number of shifted images sent until the end of
  the first alarming window, over ``--trials`` trials per shift, each stopped after ``--max-images`` shifted images
  (not detected). Shifts: Gaussian noise (sigma 0.1, 0.3; clamped to [0, 1]), rotation (15, 30 degrees, bilinear,
  zero padding), brightness (+0.2, clamped), inversion (1 - x), class prior (each image's true class drawn with
  probability 2/15 for classes 0-4 and 1/15 for 5-9, then an image of that class; uniform in the test split).

    PYTHONPATH=src nice -n 10 python bench/measure_drift.py --dataset mnist5k --seed 0 --out drift_mnist_s0.json

Bounded: at most ``--windows`` + shifts x trials x max-images / window tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safedl.data import load_builtin, stratified_split
from safedl.deploy.drift_reference import compute_reference
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.models.features import extract_features
from safedl.serve.monitor.two_sample import MMDPermutationTest, chi2_homogeneity
from safedl.utils.stats import proportion
from safedl.utils.tensors import seed_everything

log = logging.getLogger("measure_drift")
ALPHA = 0.005
ARCH = {"mnist5k": ("small_cnn", 28), "digits": ("tiny_cnn", 8)}


def trained_model(dataset: str, seed: int, epochs: int):
    splits = stratified_split(load_builtin(dataset), test_fraction=0.2, val_fraction=0.1, seed=seed)
    arch, size = ARCH[dataset]
    seed_everything(seed)
    model = with_normalization(build_model(arch, in_channels=1, num_classes=10, image_size=size),
                               splits.mean, splits.std)
    cache = Path(f"/tmp/safedl_drift_{dataset}_{arch}_seed{seed}_e{epochs}.pt")
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        train_model(model, splits.train, recipe=TrainRecipe(epochs=epochs), seed=seed, val=splits.val)
        torch.save(model.state_dict(), cache)
    return model.eval(), splits


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shifts(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    return {
        "gaussian_noise_0.1": lambda x: (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1),
        "gaussian_noise_0.3": lambda x: (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1),
        "rotation_15": lambda x: rotate(x, 15), "rotation_30": lambda x: rotate(x, 30),
        "brightness_+0.2": lambda x: (x + 0.2).clamp(0, 1), "inversion": lambda x: 1.0 - x,
    }


class Tester:
    def __init__(self, model, ref, *, permutations: int, seed: int):
        self.model, self.mmd = model, MMDPermutationTest(ref.features, permutations=permutations)
        self.pred_counts = torch.bincount(ref.pred_labels, minlength=ref.num_classes)
        self.k, self.gen, self.times = ref.num_classes, torch.Generator().manual_seed(seed), []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return extract_features(self.model, x), self.model(x).argmax(1)

    def test(self, f: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        p_in = self.mmd(f, generator=self.gen).p_value
        p_pred = chi2_homogeneity(self.pred_counts, torch.bincount(y, minlength=self.k)).p_value
        self.times.append(time.perf_counter() - t0)
        return p_in, p_pred


def false_alarms(t: Tester, f: torch.Tensor, y: torch.Tensor, *, windows: int, window: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 2)
    hits = {"input": 0, "prediction": 0, "either": 0}
    for _ in range(windows):
        idx = torch.randperm(len(f), generator=g)[:window]
        p_in, p_pred = t.test(f[idx], y[idx])
        hits["input"] += p_in <= ALPHA
        hits["prediction"] += p_pred <= ALPHA
        hits["either"] += min(p_in, p_pred) <= ALPHA
    return {k: proportion(v, windows) for k, v in hits.items()}


def prior_sample(y: torch.Tensor, prior: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` indices whose classes are drawn from ``prior``, each class's images without replacement."""
    counts = torch.bincount(torch.multinomial(prior, n, replacement=True, generator=g), minlength=len(prior))
    out = []
    for c, k in enumerate(counts.tolist()):
        pool = torch.nonzero(y == c).flatten()
        out.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return torch.cat(out)


def delay(t: Tester, clean: tuple, shifted: tuple, *, prior: torch.Tensor | None, trials: int, window: int,
          max_images: int, seed: int) -> dict:
    """Shifted images sent until the first alarming window ends, per trial (None: not within max_images)."""
    g = torch.Generator().manual_seed(seed + 3)
    out = []
    for _ in range(trials):
        off = int(torch.randint(0, window, (1,), generator=g))      # clean images already in the open window
        sent, found = 0, None
        while sent < max_images and found is None:
            n_clean = off if sent == 0 else 0
            n_shift = window - n_clean
            ci = torch.randperm(len(clean[0]), generator=g)[:n_clean]
            si = (prior_sample(shifted[2], prior, n_shift, g) if prior is not None
                  else torch.randperm(len(shifted[0]), generator=g)[:n_shift])
            f = torch.cat([clean[0][ci], shifted[0][si]])
            y = torch.cat([clean[1][ci], shifted[1][si]])
            sent += n_shift
            if min(t.test(f, y)) <= ALPHA:
                found = sent
        out.append(found)
    got = [d for d in out if d is not None]
    return {"detected": proportion(len(got), trials), "median_delay": statistics.median(got) if got else None,
            "p90_delay": sorted(got)[max(0, math.ceil(0.9 * len(got)) - 1)] if got else None,
            "max_images": max_images}


def _pct(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n={m['n']})"


def table(paths: list[Path]) -> str:
    """The README's Markdown table of result files (one column per file)."""
    runs = [json.loads(p.read_text()) for p in paths]
    head = [f"{r['dataset']} seed {r['seed']} ({r['epochs']} epochs; ref {r['reference_images']}, held-out "
            f"{r['held_out_images']})" for r in runs]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(runs)]
    for test in ("input", "prediction", "either"):
        lines.append(f"| false alarms per window: {test} | " + " | ".join(_pct(r["false_alarms"][test]) for r in runs)
                     + " |")
    for shift in runs[0]["delay"]:
        cells = []
        for r in runs:
            d = r["delay"][shift]
            med = "-" if d["median_delay"] is None else f"{d['median_delay']:g} / {d['p90_delay']:g}"
            cells.append(f"{med}; detected {_pct(d['detected'])}")
        lines.append(f"| delay {shift}: median / p90 images | " + " | ".join(cells) + " |")
    lines.append("| one window's tests: median / max s (1 thread) | " + " | ".join(
        f"{r['test_seconds']['median']:.3f} / {r['test_seconds']['max']:.3f} (n={r['test_seconds']['n']})"
        for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(ARCH), default="mnist5k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--permutations", type=int, default=199)
    ap.add_argument("--windows", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--max-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=TrainRecipe().epochs, help="training epochs (default recipe: 8)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", type=Path, nargs="+", help="print the Markdown table of these result files and stop")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))  # noqa: T201 - the table is this mode's output
        return
    if a.out is None:
        ap.error("--out is required (or --table FILES)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    model, splits = trained_model(a.dataset, a.seed, a.epochs)
    ref = compute_reference(model, splits.val.x, splits.val.y, num_classes=10, seed=0)
    t = Tester(model, ref, permutations=a.permutations, seed=a.seed)
    clean = t.encode(splits.test.x)
    res = {"dataset": a.dataset, "seed": a.seed, "epochs": a.epochs, "window": a.window, "permutations": a.permutations,
           "alpha": ALPHA, "reference_images": len(ref.features), "held_out_images": len(splits.test),
           "feature_dim": int(ref.features.shape[1])}
    res["false_alarms"] = false_alarms(t, *clean, windows=a.windows, window=a.window, seed=a.seed)
    log.info("false alarms: %s", {k: round(v["value"], 4) for k, v in res["false_alarms"].items()})
    res["delay"] = {}
    for name, fn in shifts(a.seed).items():
        res["delay"][name] = delay(t, clean, t.encode(fn(splits.test.x)), prior=None, trials=a.trials,
                                   window=a.window, max_images=a.max_images, seed=a.seed)
        log.info("%s: %s", name, res["delay"][name])
    prior = torch.where(torch.arange(10) < 5, 2.0, 1.0) / 15.0   # true labels 0-4: 2/15 each, 5-9: 1/15 each
    res["delay"]["class_prior_0-4_x2"] = delay(t, clean, (*clean, splits.test.y), prior=prior, trials=a.trials,
                                               window=a.window, max_images=a.max_images, seed=a.seed)
    log.info("class prior: %s", res["delay"]["class_prior_0-4_x2"])
    res["test_seconds"] = {"median": statistics.median(t.times), "max": max(t.times), "n": len(t.times),
                           "threads": a.threads}
    res["wall_s"] = time.perf_counter() - t_start
    a.out.write_text(json.dumps(res, indent=2))
    log.info("wrote %s (%.0f s)", a.out, res["wall_s"])


if __name__ == "__main__":
    main()
