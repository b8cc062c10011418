"""Issue 26, a negative result: can conferrable adversarial examples (after Lukas, Zhang & Kerschbaum, ICLR 2021)
fingerprint copies of a tiny digits model? Our own simplified variant, offline, not part of the package:

- victim: the test suite's tiny_cnn recipe (bench/measure_model_stealing.victim_model), seed --seed;
- 3 surrogates trained on the victim's labels of the training split, 3 reference models trained on the true labels
  (generation), 4 more reference models held out to estimate the null rate;
- candidates: L-inf PGD (--eps, 60 steps of 0.02) from the correctly classified validation images towards the victim's
  second class, minimising -log M(x)_t - log mean_S S(x)_t - log(1 - mean_R R(x)_t); kept: victim and every
  surrogate say t, no generation reference does; the 100 with the highest M_t * S_t * (1 - R_t);
- null rate p0: the upper 95% Wilson bound of the held-out references' matches; a suspect's p-value is
  P[Binomial(n, p0) >= its matches] (approximate: fingerprints are not independent);
- suspects: copycat copies (scores and labels, 250-2000 queries, 10 epochs) and 5 independent models.

    PYTHONPATH=src:bench nice -n 10 python bench/measure_conferrable_fingerprint.py --seed 0
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

import torch
from scipy.stats import binom

from measure_model_stealing import labels, steal, victim_model
from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.stats import wilson_interval
from safedl.utils.tensors import seed_everything

log = logging.getLogger("bench.fingerprint")


def trained_on(sp, y: torch.Tensor, seed: int):
    seed_everything(seed)
    c, h, _ = sp.shape
    m = with_normalization(build_model("tiny_cnn", in_channels=c, num_classes=sp.num_classes, image_size=h),
                           sp.mean, sp.std)
    train_model(m, dataclasses.replace(sp.train, y=y), recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3,
                                                                          augment="none"), seed=seed)
    return m.eval()


def mean_probs(models, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([m(x).softmax(1) for m in models]).mean(0)


def fingerprints(victim, surr, refs, x0, y0, *, eps: float, n: int = 100, steps: int = 60, step: float = 0.02):
    """(images, target labels) of the most conferrable candidates."""
    ok = labels(victim, x0) == y0
    x0, y0 = x0[ok], y0[ok]
    with torch.no_grad():
        p = victim(x0).softmax(1)
        p[torch.arange(len(y0)), y0] = -1
        t = p.argmax(1)
    idx, x = torch.arange(len(t)), x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = -(victim(x).log_softmax(1)[idx, t] + mean_probs(surr, x)[idx, t].clamp_min(1e-12).log()
                 + (1 - mean_probs(refs, x)[idx, t]).clamp_min(1e-12).log()).sum()
        g, = torch.autograd.grad(loss, x)
        x = torch.min(torch.max(x.detach() - step * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    with torch.no_grad():
        score = victim(x).softmax(1)[idx, t] * mean_probs(surr, x)[idx, t] * (1 - mean_probs(refs, x)[idx, t])
        keep = (labels(victim, x) == t) & torch.stack([labels(m, x) == t for m in surr]).all(0) \
            & ~torch.stack([labels(m, x) == t for m in refs]).any(0)
    order = torch.argsort(score * keep, descending=True)[:n]
    order = order[keep[order]]
    return x[order], t[order], int(keep.sum()), len(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    set_enabled(False)
    torch.set_num_threads(1)
    sp = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=args.seed)
    victim = victim_model(sp, args.seed)
    vl = labels(victim, sp.train.x)
    surr = [trained_on(sp, vl, 100 + i) for i in range(3)]
    refs = [trained_on(sp, sp.train.y, 200 + i) for i in range(3)]
    held = [trained_on(sp, sp.train.y, 300 + i) for i in range(4)]
    fx, ft, kept, cand = fingerprints(victim, surr, refs, sp.val.x, sp.val.y, eps=args.eps)
    n = len(ft)
    hm = sum(int((labels(m, fx) == ft).sum()) for m in held)
    p0 = wilson_interval(hm, n * len(held))[1]
    log.info("candidates %d, conferrable %d, fingerprints %d; held-out references match %d/%d, p0 %.4f",
             cand, kept, n, hm, n * len(held), p0)

    def verdict(name: str, m) -> None:
        k = int((labels(m, fx) == ft).sum())
        log.info("%-28s matches %3d/%d  p %.3g", name, k, n, binom.sf(k - 1, n, p0))

    for budget in (250, 500, 1000, 2000):
        for output in ("scores", "labels"):
            attack = registry.create("extraction", "copycat", pool="train", epochs=10, seed=args.seed)
            verdict(f"copycat {output} {budget}", steal(victim, attack, sp.train.x, budget, output=output)[0])
    for arch, s in (("tiny_cnn", 1), ("tiny_cnn", 2), ("tiny_cnn", 3), ("small_cnn", 1), ("small_cnn", 2)):
        verdict(f"independent {arch} seed {args.seed + s}", victim_model(sp, args.seed + s, arch))


if __name__ == "__main__":
    main()
