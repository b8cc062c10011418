"""Measure the evasion defenses of issue 6 on mnist5k (small_cnn, TrainRecipe() defaults, L-inf eps 0.3, seed 0).

    .venv/bin/python bench/measure_evasion_defenses.py [--parts at,preprocess,detect,smoothing,post] [--n 500]
        [--threads 2] [--detect-runs lid,lid_fgsm,lid_paper,mahalanobis,mahalanobis_fgsm]

Parts: ``at`` PGD adversarial training (PGD-10, 20 epochs, otherwise the baseline recipe; wall and CPU time)
vs the full default ``ensemble`` (APGD-CE, APGD-T over 9 targets, Square 5000 queries) with the member that broke
each sample, plus PGD-40 and APGD-CE at eps 0.5 as gradient-masking checks; ``at_eval`` the same evaluation of the
model saved by ``at``;
``preprocess`` non-adaptive vs adaptive (BPDA/EOT) robust accuracy of feature squeezing, spatial smoothing, JPEG;
``detect`` lid and mahalanobis fitted on PGD-40 examples (the attack they are tested on, as the papers do), on
FGSM (cross-attack) and LID with the paper's 100-image minibatch: TPR at 5% FPR (threshold from held-out clean val
images) on non-adaptive PGD-40, and on detector-aware PGD-40 (adaptive), ``--detect-runs`` picks a subset;
``smoothing`` randomized smoothing (sigma 0.5) certified accuracy at L2 radii 0.5/1.0/1.5; ``post`` output
postprocessors against score-based ``square`` / ``transfer``.
Every number prints with its n and 95% Wilson interval.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.adaptive import DetectorAwarePGD, defended_model
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

SEED = 0
EPS = 0.3
DETECT_RUNS = ["lid", "lid_fgsm", "lid_paper", "mahalanobis", "mahalanobis_fgsm"]
log = logging.getLogger("bench")


def fmt(name: str, k: int, n: int) -> str:
    m = proportion(k, n)
    return f"{name}: {m['value']:.3f} (n={n}, 95% CI [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}])"


def fresh(splits):
    seed_everything(SEED)
    net = build_model("small_cnn", in_channels=1, num_classes=10, image_size=28)
    return with_normalization(net, splits.mean, splits.std)


def baseline(splits, cache="/tmp/edef_base_model.pt"):
    """The undefended small_cnn (TrainRecipe() defaults, seed 0), cached between runs of this script."""
    import os

    model = fresh(splits)
    if os.path.exists(cache):
        model.load_state_dict(torch.load(cache))
        print(f"baseline reloaded from {cache}")
    else:
        t0 = time.perf_counter()
        train_model(model, splits.train, recipe=TrainRecipe(), seed=SEED, val=splits.val)
        torch.save(model.state_dict(), cache)
        print(f"baseline trained in {time.perf_counter() - t0:.0f}s")
    model.eval()
    print("baseline " + fmt("clean_accuracy", int((predict(model, splits.test.x) == splits.test.y).sum()), len(splits.test)))
    return model


def batched(fn, x, y, bs=250):
    return torch.cat([fn(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])


AT_PARAMS = {"attack": "pgd", "eps": EPS, "steps": 10, "ratio": 1.0, "epochs": 20}


def part_at(splits, n):
    """PGD adversarial training (AT_PARAMS: PGD-10 with step 2.5 * eps / 10, eps ramped over the first quarter,
    20 epochs, every other setting the TrainRecipe() baseline recipe), timed in wall and CPU seconds, then the
    full default ``ensemble`` (APGD-CE, APGD-T over 9 target classes, Square with 5000 queries) on the first n test
    images, with which member broke each sample; PGD-40 and APGD-CE at eps 0.5 as gradient-masking checks."""
    trainer = registry.create("trainer", "adversarial_training", **AT_PARAMS)
    model = fresh(splits)
    cpu0 = time.process_time()
    trainer.fit(model, splits.train, recipe=TrainRecipe(), seed=SEED, val=splits.val)
    cpu_s = time.process_time() - cpu0
    torch.save(model.state_dict(), "/tmp/edef_at_model.pt")
    x, y = splits.test.x, splits.test.y
    clean = predict(model, x) == y
    print(f"[at] adversarial_training({AT_PARAMS}) trained in {trainer.time_s_:.0f}s wall, {cpu_s:.0f}s CPU "
          f"on {torch.get_num_threads()} thread(s) of a shared machine, {len(splits.train)} train images, recipe TrainRecipe() "
          f"with epochs={AT_PARAMS['epochs']} (seed {SEED})")
    print("[at] " + fmt("clean_accuracy", int(clean.sum()), len(y)))
    evaluate_robust(model, x[:n], y[:n], clean[:n])
    return model


def evaluate_robust(model, xs, ys, clean):
    n = len(ys)
    attack = registry.create("evasion", "ensemble", eps=EPS)
    t0 = time.perf_counter()
    parts = [(attack(model, xs[i:i + 250], ys[i:i + 250]), attack.broken_by_.clone()) for i in range(0, n, 250)]
    x_adv, broken_by = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rob = (predict(model, x_adv) == ys) & clean
    assert float((x_adv - xs).abs().max()) <= EPS + 1e-6
    print("[at] " + fmt(f"robust_accuracy vs ensemble {attack.attacks} eps {EPS}", int(rob.sum()), n)
          + f" ({time.perf_counter() - t0:.0f}s)")
    for i, spec in enumerate(attack.attacks):
        print(f"[at]   broken by {spec['name']}{'-T' if spec['params'].get('n_target_classes') else ''}: "
              f"{int((broken_by == i).sum())}/{n}")
    pgd = registry.create("evasion", "pgd", eps=EPS, steps=40, seed=SEED)
    x_pgd = batched(lambda a, b: pgd(model, a, b), xs, ys)
    print("[at] " + fmt(f"robust_accuracy vs PGD-40 eps {EPS}", int(((predict(model, x_pgd) == ys) & clean).sum()), n))
    big = registry.create("evasion", "apgd_ce", eps=0.5)
    m = min(n, 100)
    x_big = batched(lambda a, b: big(model, a, b), xs[:m], ys[:m])
    print("[at] " + fmt("robust_accuracy vs APGD-CE eps 0.5 (should be near 0 without gradient masking)",
                        int((predict(model, x_big) == ys[:m]).sum()), m))


def pgd40():
    return registry.create("evasion", "pgd", eps=EPS, steps=40, seed=SEED)


def part_preprocess(splits, base, n):
    x, y = splits.test.x[:n], splits.test.y[:n]
    attack = pgd40()
    x_na = batched(lambda a, b: attack(base, a, b), x, y)
    print(f"[preprocess] PGD-40 eps {EPS} (seed {SEED}) on the undefended model: "
          + fmt("robust_accuracy", int((predict(base, x_na) == y).sum()), n))
    for name, params in (("feature_squeezing", {"bit_depth": 1}), ("spatial_smoothing", {"window": 2}),
                         ("jpeg_compression", {"quality": 75})):
        pre = registry.create("preprocessor", name, **params)
        deployed = defended_model([pre], base, adaptive=False)
        adaptive = defended_model([pre], base, adaptive=True)
        t0 = time.perf_counter()
        x_ad = batched(lambda a, b: attack(adaptive, a, b), x, y)
        how = "gradients" if pre.differentiable else ("BPDA through the differentiable JPEG" if name == "jpeg_compression"
                                                      else "BPDA (identity)")
        print(f"[preprocess] {name} {params}: " + fmt("clean_accuracy", int((predict(deployed, x) == y).sum()), n))
        print(f"[preprocess]   " + fmt("robust_accuracy_nonadaptive", int((predict(deployed, x_na) == y).sum()), n))
        print(f"[preprocess]   " + fmt(f"robust_accuracy (adaptive, {how})", int((predict(deployed, x_ad) == y).sum()), n)
              + f" ({time.perf_counter() - t0:.0f}s)")


def part_detect(splits, base, n):
    """lid and mahalanobis as the stage handler runs them: fitted on 2000 clean training images (their own fit makes
    the adversarial examples: PGD-40 at eps 0.3, the attack they are tested on, as Ma et al. and Lee et al. do),
    threshold calibrated on the even half of val, metric threshold for 5% FPR set on the odd half; tested on the
    first n test images. Cross-attack: the same detectors fitted on FGSM examples, tested on PGD-40. Adaptive:
    detector-aware PGD-40 (classification margin + hinge on the detector score above its threshold)."""
    from safedl.utils.stats import auroc

    x, y = splits.test.x[:n], splits.test.y[:n]
    attack = pgd40()
    x_na = batched(lambda a, b: attack(base, a, b), x, y)
    fooled = predict(base, x_na) != y
    k = int(fooled.sum())
    print(f"[detect] PGD-40 eps {EPS} (seed {SEED}) fools the undefended model on {k}/{n} test images (the positives)")
    x_fit, y_fit = splits.train.x[:2000], splits.train.y[:2000]
    x_cal, x_thr = splits.val.x[::2], splits.val.x[1::2]
    runs = {"lid": ("lid", "pgd", {"steps": 40}, {}), "lid_fgsm": ("lid", "fgsm", {}, {}),
            "lid_paper": ("lid", "pgd", {"steps": 40}, {"k": 20, "reference_size": 100}),  # the paper's minibatch
            "mahalanobis": ("mahalanobis", "pgd", {"steps": 40}, {}),
            "mahalanobis_fgsm": ("mahalanobis", "fgsm", {}, {})}
    for tag in DETECT_RUNS:
        name, fit_attack, fit_params, extra = runs[tag]
        t0 = time.perf_counter()
        det = registry.create("detector", name, fpr=0.05, attack=fit_attack, attack_params=fit_params,
                              **extra).fit(x_fit, model=base, y=y_fit, x_calibration=x_cal, seed=SEED)
        fit_s = time.perf_counter() - t0
        t5 = float(torch.quantile(det.score(x_thr).double(), 0.95, interpolation="higher"))
        s_clean, s_na = det.score(x), det.score(x_na)
        label = f"{name} fitted on {fit_attack}{'-40' if fit_attack == 'pgd' else ''}"
        print(f"[detect] {label} ({det.params()}) in {fit_s:.0f}s; threshold for 5% FPR from {len(x_thr)} held-out "
              f"clean val images")
        print(f"[detect]   " + fmt("clean test fpr", int((s_clean > t5).sum()), n))
        print(f"[detect]   non-adaptive PGD-40: " + fmt("tpr at 5% fpr", int((s_na[fooled] > t5).sum()), k)
              + f", auroc {auroc(s_clean, s_na[fooled]):.3f}")
        if fit_attack != "pgd" or extra:
            continue
        t0 = time.perf_counter()
        dpgd = DetectorAwarePGD(eps=EPS, steps=40, seed=SEED)
        x_ad = batched(lambda a, b: dpgd(base, [det], a, b), x, y)
        s_ad = det.score(x_ad)
        fooled_ad = predict(base, x_ad) != y
        k2 = int(fooled_ad.sum())
        evaded = fooled_ad & (s_ad <= t5)
        print(f"[detect]   adaptive detector-aware PGD-40: " + fmt("tpr at 5% fpr", int((s_ad[fooled_ad] > t5).sum()), k2)
              + f", auroc {auroc(s_clean, s_ad[fooled_ad]):.3f}; "
              + fmt("defended (rejected or correct)", n - int(evaded.sum()), n) + f" ({time.perf_counter() - t0:.0f}s)")


def part_smoothing(splits, base, n, *, samples=5500, n_images=50):
    cert = registry.create("certifier", "randomized_smoothing", sigma=0.5, n0=100, n=samples, alpha=0.001, seed=SEED)
    model = fresh(splits)
    cert.fit(model, splits.train, recipe=TrainRecipe(), seed=SEED, val=splits.val)
    x, y = splits.test.x[:n_images], splits.test.y[:n_images]
    t0 = time.perf_counter()
    res = cert.certified_accuracy(x, y, [0.0, 0.5, 1.0, 1.5])
    print(f"[smoothing] randomized_smoothing sigma 0.5, base trained with noise in {cert.time_s_:.0f}s; CERTIFY n0=100, "
          f"n={samples}, alpha=0.001 on {n_images} test images ({time.perf_counter() - t0:.0f}s)")
    for r, (k, m) in res.items():
        print(f"[smoothing]   " + fmt(f"certified accuracy at L2 radius {r}", k, m))


def part_post(splits, base, n):
    names = registry.names("evasion")
    x, y = splits.test.x[: min(n, 100)], splits.test.y[: min(n, 100)]
    for aname in ("square", "transfer"):
        if aname not in names:
            print(f"[post] attack {aname!r} is not registered; skipped")
            continue
        for post in (None, "reverse_sigmoid", "rounding", "top_k", "class_labels", "gaussian_noise"):
            posts = [] if post is None else [registry.create("postprocessor", post)]
            deployed = defended_model([], base, posts, adaptive=False)
            attack = registry.create("evasion", aname, eps=EPS, **({"max_queries": 300} if aname == "square" else {}))
            if hasattr(attack, "fit"):
                attack.fit(splits.train, model=deployed, device="cpu")
            t0 = time.perf_counter()
            x_adv = batched(lambda a, b: attack(deployed, a, b), x, y)
            print(f"[post] {aname} vs {post or 'no postprocessor'}: "
                  + fmt("robust_accuracy", int((predict(deployed, x_adv) == y).sum()), len(y))
                  + f" ({time.perf_counter() - t0:.0f}s)")


def part_at_eval(splits, n, *, path="/tmp/edef_at_model.pt"):
    """Re-evaluate the adversarially trained model saved by ``at`` (same evaluation, no retraining)."""
    model = fresh(splits)
    model.load_state_dict(torch.load(path))
    model.eval()
    x, y = splits.test.x, splits.test.y
    clean = predict(model, x) == y
    print("[at_eval] " + fmt("clean_accuracy", int(clean.sum()), len(y)))
    evaluate_robust(model, x[:n], y[:n], clean[:n])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="at,preprocess,detect,smoothing,post")
    ap.add_argument("--n", type=int, default=500, help="test images per evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--at-model", default="/tmp/edef_at_model.pt", help="state dict that at_eval evaluates")
    ap.add_argument("--detect-runs", default=",".join(DETECT_RUNS), help="subset of: " + ",".join(DETECT_RUNS))
    args = ap.parse_args()
    DETECT_RUNS[:] = args.detect_runs.split(",")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("safedl.models.train").setLevel(logging.DEBUG)  # per-epoch loss / val accuracy
    splits = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=SEED)
    print(f"mnist5k: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, seed {SEED}")
    parts = args.parts.split(",")
    base = None
    for part in parts:
        if part == "at":
            part_at(splits, args.n)
            continue
        if part == "at_eval":
            part_at_eval(splits, args.n, path=args.at_model)
            continue
        if base is None:
            base = baseline(splits)
        globals()[f"part_{part}"](splits, base, args.n)


if __name__ == "__main__":
    main()
