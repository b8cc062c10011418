"""Measure issue 5's "Done when" on mnist5k: poison/backdoor defenses scored against the attack's ground truth.

Setup: stratified_split(load_builtin('mnist5k'), test_fraction=0.2, val_fraction=0.1, seed=0), small_cnn,
TrainRecipe() defaults, seed 0. Backdoor: static_patch, trigger 'pattern', dirty-label, target class 7, 10% and 1%
of the training set. The trusted clean set for the cleansers and repairs is the validation split.

    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor   # SS, AC, fine-pruning, neural cleanse
    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor --scenarios 0.01 --skip-baseline
    .venv/bin/python bench/measure_poisoning_defenses.py --part labels     # data cleaning, robust loss, DP-SGD

Each part prints one JSON line per measurement (proportions with n and 95% Wilson intervals).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

SEED = 0


def fresh(s):
    seed_everything(SEED)
    return with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28), s.mean, s.std)


def train(s, data, **kw):
    m = fresh(s)
    train_model(m, data, recipe=TrainRecipe(), seed=SEED, **kw)
    return m.eval()


def acc(m, data):
    pred = predict(m, data.x)
    return proportion(int((pred == data.y).sum()), len(data))


def asr(m, xt, target):
    pred = predict(m, xt)
    return proportion(int((pred == target).sum()), len(xt))


def detection(res, truth):
    f, t = res.is_suspect, truth
    tp, fp = int((f & t).sum()), int((f & ~t).sum())
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(t.numpy(), res.score.numpy())) if 0 < int(t.sum()) < len(t) else float("nan")
    return {"tpr": proportion(tp, int(t.sum())), "fpr": proportion(fp, int((~t).sum())),
            "precision": proportion(tp, tp + fp), "auroc": auc, "flagged": int(f.sum())}


def out(**kw):
    print(json.dumps(kw, default=str), flush=True)


def backdoor(s, base_acc, scenarios=(0.1, 0.01)):
    for frac in scenarios:
        atk = registry.create("backdoor", "static_patch", target_class=7, trigger="pattern", poison_fraction=frac,
                              label_mode="dirty", seed=SEED)
        p = atk.poison(s.train, generator=torch.Generator().manual_seed(SEED))
        xt = atk.apply_trigger(s.test.x[s.test.y != 7])
        t0 = time.perf_counter()
        m = train(s, p)
        out(scenario=frac, stage="poisoned", n_poison=p.n_poison, clean_accuracy=acc(m, s.test), asr=asr(m, xt, 7),
            train_s=round(time.perf_counter() - t0, 1))
        for name in ("spectral_signatures", "activation_clustering"):
            t0 = time.perf_counter()
            res = registry.create("cleanser", name).find_poison(p, model=m, trusted=s.val)
            det = detection(res, p.is_poison)
            dt = time.perf_counter() - t0
            m2 = train(s, p.subset(res.keep))
            out(scenario=frac, defense=name, **det, time_s=round(dt, 1), poisoned_classes=res.info["poisoned_classes"],
                clean_accuracy_after=acc(m2, s.test), asr_after=asr(m2, xt, 7), baseline_accuracy=base_acc)
        if frac == 0.1:
            for name in ("fine_pruning", "neural_cleanse"):
                t0 = time.perf_counter()
                rep = registry.create("repair", name)
                m3 = rep.repair(m, clean=s.val, seed=SEED)
                out(scenario=frac, defense=name, time_s=round(time.perf_counter() - t0, 1), report=rep.report_,
                    clean_accuracy_after=acc(m3, s.test), asr_after=asr(m3, xt, 7), baseline_accuracy=base_acc)


def flip(train: Dataset, frac: float) -> PoisonedDataset:
    """label_flipping fully_random at ``frac`` (the registered attack; a seeded uniform flip if it is missing)."""
    if "label_flipping" in registry.names("poisoning"):
        atk = registry.create("poisoning", "label_flipping", strategy="fully_random", flip_rate=frac, target_class=None)
        return atk.poison(train, generator=torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(SEED)
    n = len(train)
    idx = torch.randperm(n, generator=g)[: int(round(frac * n))]
    y = train.y.clone()
    y[idx] = (y[idx] + torch.randint(1, train.num_classes, (len(idx),), generator=g)) % train.num_classes
    return PoisonedDataset.from_clean(train, x=train.x, y=y, info={"attack": "random_flip", "fraction": frac})


def labels(s):
    names = registry.names("poisoning")
    p10 = flip(s.train, 0.1)
    out(stage="label_flip_10", attack="label_flipping fully_random" if "label_flipping" in names else "own random flip",
        n_poison=p10.n_poison, flip_fraction_of_train=p10.poison_fraction)
    t0 = time.perf_counter()
    dc = registry.create("cleanser", "data_cleaning", n_folds=3)
    res = dc.find_poison(p10, train_fn=lambda d, **kw: train(s, d, **kw))
    out(defense="data_cleaning", method="loss_filtering", **detection(res, p10.is_poison),
        time_s=round(time.perf_counter() - t0, 1), info={k: v for k, v in res.info.items()})
    losses = res.score
    res2 = registry.create("cleanser", "data_cleaning", method="outlier_detection").find_poison(p10, losses=losses)
    out(defense="data_cleaning", method="outlier_detection", **detection(res2, p10.is_poison))
    p20 = flip(s.train, 0.2)
    m_ce = train(s, p20)
    out(stage="label_flip_20", defense="none (cross-entropy)", clean_accuracy=acc(m_ce, s.test))
    for loss in ("gce", "symmetric_cross_entropy"):
        t0 = time.perf_counter()
        m = fresh(s)
        registry.create("trainer", "robust_loss", loss=loss).fit(m, p20, recipe=TrainRecipe(), seed=SEED)
        out(stage="label_flip_20", defense=f"robust_loss:{loss}", clean_accuracy=acc(m, s.test),
            time_s=round(time.perf_counter() - t0, 1))
        break  # one robust loss is enough for the target; the others are in the tests
    t0 = time.perf_counter()
    dp = registry.create("trainer", "dp_training", target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0)
    m = dp.fit(fresh(s), s.train, recipe=TrainRecipe(), seed=SEED)
    out(defense="dp_training", target_epsilon=8.0, epsilon_spent=dp.epsilon_spent_, noise_multiplier=dp.noise_multiplier_,
        clean_accuracy=acc(m, s.test), time_s=round(time.perf_counter() - t0, 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("backdoor", "labels", "all"), default="all")
    ap.add_argument("--scenarios", type=float, nargs="+", default=[0.1, 0.01], help="backdoor poison fractions")
    ap.add_argument("--skip-baseline", action="store_true", help="do not retrain the clean baseline (backdoor part)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from safedl.utils.progress import set_enabled

    set_enabled(False)
    s = stratified_split(load_builtin("mnist5k"), test_fraction=0.2, val_fraction=0.1, seed=SEED)
    out(seed=SEED, n_train=len(s.train), n_val=len(s.val), n_test=len(s.test))
    if args.part in ("backdoor", "all"):
        base_acc = None
        if not args.skip_baseline:
            t0 = time.perf_counter()
            base_acc = acc(train(s, s.train), s.test)
            out(stage="baseline", clean_accuracy=base_acc, train_s=round(time.perf_counter() - t0, 1))
        backdoor(s, base_acc, tuple(args.scenarios))
    if args.part in ("labels", "all"):
        labels(s)


if __name__ == "__main__":
    main()
