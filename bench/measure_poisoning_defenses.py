"""Measure issue 5's "Done when" on mnist5k: poison/backdoor defenses scored against the attack's ground truth.

Setup: stratified_split(load_builtin('mnist5k'), test_fraction=0.2, val_fraction=0.1, seed=SEED), small_cnn,
TrainRecipe() defaults, SEED 0 unless --seed. Backdoor: static_patch, trigger 'pattern', dirty-label, target class 7,
10% and 1% of the training set. The trusted clean set for the cleansers and repairs is the validation split (500);
ASR is measured on the 900 triggered non-7 test images, clean accuracy on the 1000 test images.

    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor   # SS, AC, fine-pruning, neural cleanse
    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor --scenarios 0.01 --skip-baseline
    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor --scenarios 0.1 \
        --defenses fine_pruning neural_cleanse fine_pruning:prune_only fine_pruning:epochs=5,lr=5e-4   # repairs
    .venv/bin/python bench/measure_poisoning_defenses.py --seed 1 --part backdoor --scenarios 0.1 \
        --defenses fine_pruning fine_pruning:prune_only                        # an untuned replicate
    .venv/bin/python bench/measure_poisoning_defenses.py --part backdoor --scenarios 0.1 --skip-baseline \
        --defenses neural_cleanse                                              # Neural Cleanse (log-space index)
    .venv/bin/python bench/measure_poisoning_defenses.py --part nc_clean   # Neural Cleanse's false alarms
    .venv/bin/python bench/measure_poisoning_defenses.py --part labels     # data cleaning, DP-SGD, influence, RONI
    .venv/bin/python bench/measure_poisoning_defenses.py --part robust_loss --seeds 10  # CE vs robust losses
    .venv/bin/python bench/measure_poisoning_defenses.py --part robust_loss --seeds 3 --loss-recipe long

Each part prints one JSON line per measurement (proportions with n and 95% Wilson intervals; means over seeds with
t intervals). Measured (torch single-threaded, CPU):
- repairs, scenario (a), seeds 0-4 (``--seed k --part backdoor --scenarios 0.1 --defenses fine_pruning
  neural_cleanse``; baselines 0.971-0.984, poisoned ASR 1.0). fine_pruning (36-54 of 64 last-conv channels pruned at
  the 4% bound, then 10 epochs at 3e-3): ASR 0.066, 0.023, 0.131, 0.136, 0.030 (n=900 each), clean accuracy 1.5,
  2.4, 1.9, 2.8, 3.2 points below the baseline: "ASR <= 0.10 within 2 points" holds at seed 0 only (variants:
  bench/ablate_fine_pruning.py). neural_cleanse (log-space anomaly index, the default): flags class 7 alone at every
  seed, ASR 0.049, 0.018, 0.037, 0.009, 0.017, clean 0.3, 1.3, 1.1, 1.5, 1.9 points below: the target holds at all
  five. With the paper's L1 index (``neural_cleanse:l1``) class 7 is flagged at seeds 2 and 4 only.
- cleansers on the same backdoor, seed 0, AUROC (10% / 1% poison): influence_functions 0.895 / 0.988, isolation
  forest 0.571 / 0.927, LOF 0.404 / 0.436, RONI 0.529 / 0.521 (``--defenses influence_functions anomaly_detection
  anomaly_detection:lof roni``); on 10% random label flips (``--part labels``): influence 0.912, isolation forest
  0.997, RONI 0.489.
- robust_loss, 20% fully_random flips, ``--seeds 10``: CE 0.9685; GCE -0.0065 [-0.0099, -0.0031], SCE -0.0071
  [-0.0106, -0.0036], label smoothing +0.0010 [-0.0003, +0.0023] (paired difference to CE, mean over seeds): with
  the baseline recipe (8 epochs, shift augmentation) CE does not memorise the flips, so nothing beats it beyond noise.
  With ``--loss-recipe long --seeds 3`` (30 epochs, constant rate, no augmentation, for every loss) CE memorises the
  flips and ends at 0.817; GCE +0.140 [0.110, 0.170], SCE +0.145 [0.127, 0.163], label smoothing +0.034
  [-0.015, 0.082], each better than CE on 3/3 seeds.
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


def fresh(s, seed=None):
    seed = SEED if seed is None else seed
    seed_everything(seed)
    return with_normalization(build_model("small_cnn", in_channels=1, num_classes=10, image_size=28), s.mean, s.std)


def train(s, data, seed=None, **kw):
    seed = SEED if seed is None else seed
    m = fresh(s, seed)
    train_model(m, data, recipe=TrainRecipe(), seed=seed, **kw)
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


CLEANSERS = {  # name -> (registry name, params, what find_poison is given besides the data)
    "spectral_signatures": ("spectral_signatures", {}, "model"),
    "activation_clustering": ("activation_clustering", {}, "model"),
    "anomaly_detection": ("anomaly_detection", {}, "model"),
    "anomaly_detection:lof": ("anomaly_detection", {"type": "lof"}, "model"),
    "influence_functions": ("influence_functions", {}, "train_fn"),  # TracInCP over the 8 epoch checkpoints
    "roni": ("roni", {}, "model"),
    "data_cleaning": ("data_cleaning", {"n_folds": 3}, "train_fn"),
}

REPAIRS = {  # name -> (registry name, params); the fine_pruning:* entries are ablations
    "fine_pruning": ("fine_pruning", {}),
    "neural_cleanse": ("neural_cleanse", {}),
    "neural_cleanse:l1": ("neural_cleanse", {"anomaly_space": "l1"}),  # the paper's index on L1 norms
    "fine_pruning:prune_only": ("fine_pruning", {"epochs": 0}),
    "fine_pruning:epochs=5,lr=5e-4": ("fine_pruning", {"epochs": 5, "lr": 5e-4}),
    "fine_pruning:max_accuracy_drop=0.02": ("fine_pruning", {"max_accuracy_drop": 0.02}),
}


def cleanse(s, name, data, model):
    """Run one cleanser on ``data`` (trusted set: the validation split); its result, detection scores and time."""
    reg_name, params, given = CLEANSERS[name]
    t0 = time.perf_counter()
    kw = {"model": model} if given == "model" else {"train_fn": lambda d, **k: train(s, d, **k)}
    res = registry.create("cleanser", reg_name, **params).find_poison(data, trusted=s.val, **kw)
    return res, detection(res, data.is_poison), time.perf_counter() - t0


def backdoor(s, base_acc, scenarios=(0.1, 0.01), defenses=("spectral_signatures", "activation_clustering",
                                                            "fine_pruning", "neural_cleanse")):
    for frac in scenarios:
        atk = registry.create("backdoor", "static_patch", target_class=7, trigger="pattern", poison_fraction=frac,
                              label_mode="dirty", seed=SEED)
        p = atk.poison(s.train, generator=torch.Generator().manual_seed(SEED))
        xt = atk.apply_trigger(s.test.x[s.test.y != 7])
        t0 = time.perf_counter()
        m = train(s, p)
        out(scenario=frac, stage="poisoned", n_poison=p.n_poison, clean_accuracy=acc(m, s.test), asr=asr(m, xt, 7),
            train_s=round(time.perf_counter() - t0, 1))
        for name in [d for d in defenses if d in CLEANSERS]:
            res, det, dt = cleanse(s, name, p, m)
            m2 = train(s, p.subset(res.keep))
            out(scenario=frac, defense=name, **det, time_s=round(dt, 1),
                poisoned_classes=res.info.get("poisoned_classes"), clean_accuracy_after=acc(m2, s.test),
                asr_after=asr(m2, xt, 7), baseline_accuracy=base_acc)
        if frac == 0.1:
            for name in [d for d in defenses if d in REPAIRS]:
                reg_name, params = REPAIRS[name]
                t0 = time.perf_counter()
                rep = registry.create("repair", reg_name, **params)
                m3 = rep.repair(m, clean=s.val, seed=SEED)
                out(scenario=frac, defense=name, params=params, time_s=round(time.perf_counter() - t0, 1),
                    report=rep.report_, clean_accuracy_after=acc(m3, s.test), asr_after=asr(m3, xt, 7),
                    baseline_accuracy=base_acc)


def flip(train: Dataset, frac: float, seed: int | None = None) -> PoisonedDataset:
    """label_flipping fully_random at ``frac`` (the registered attack; a seeded uniform flip if it is missing)."""
    seed = SEED if seed is None else seed
    if "label_flipping" in registry.names("poisoning"):
        atk = registry.create("poisoning", "label_flipping", strategy="fully_random", flip_rate=frac, target_class=None)
        return atk.poison(train, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
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
    m10 = train(s, p10)  # the model trained on the flipped data, shared by the model-reading cleansers
    for name in ("influence_functions", "roni", "anomaly_detection"):
        res, det, dt = cleanse(s, name, p10, m10)
        out(defense=name, attack="label_flipping fully_random 10%", **det, time_s=round(dt, 1))
    t0 = time.perf_counter()
    dp = registry.create("trainer", "dp_training", target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0)
    m = dp.fit(fresh(s), s.train, recipe=TrainRecipe(), seed=SEED)
    out(defense="dp_training", target_epsilon=8.0, epsilon_spent=dp.epsilon_spent_, noise_multiplier=dp.noise_multiplier_,
        clean_accuracy=acc(m, s.test), time_s=round(time.perf_counter() - t0, 1))


LOSS_RECIPES = {
    "baseline": TrainRecipe(),
    # long enough, with a constant rate and no augmentation, for CE to fit the flipped labels (Zhang et al. 2017,
    # "Understanding deep learning requires rethinking generalization"): the regime robust losses are meant for
    "long": TrainRecipe(epochs=30, schedule="constant", augment="none"),
}


def robust_losses(s, seeds, recipe_name="baseline"):
    """Plain CE vs the robust losses on 20% label_flipping fully_random, one recipe for all losses, several seeds.

    Seed k draws the flips, the model's initialisation and the data order; each loss sees the same flipped set and
    the same initialisation for a given seed, so the per-seed differences to CE are paired."""
    import numpy as np

    from safedl.utils.stats import mean_metric

    losses = ("cross_entropy", "gce", "symmetric_cross_entropy", "label_smoothing")
    res: dict[str, list[float]] = {k: [] for k in losses}
    recipe = LOSS_RECIPES[recipe_name]
    for seed in seeds:
        p20 = flip(s.train, 0.2, seed)
        for loss in losses:
            t0 = time.perf_counter()
            m = fresh(s, seed)
            if loss == "cross_entropy":
                train_model(m, p20, recipe=recipe, seed=seed)
            else:
                registry.create("trainer", "robust_loss", loss=loss).fit(m, p20, recipe=recipe, seed=seed)
            a = acc(m.eval(), s.test)
            res[loss].append(a["value"])
            out(stage="label_flip_20", recipe=recipe_name, seed=seed, loss=loss, n_flipped=p20.n_poison,
                clean_accuracy=a, time_s=round(time.perf_counter() - t0, 1))
    ce = np.array(res["cross_entropy"])
    for loss in losses:
        v = np.array(res[loss])
        summary = {"clean_accuracy_mean": mean_metric(v)}
        if loss != "cross_entropy":
            summary["difference_to_ce"] = mean_metric(v - ce)
            summary["seeds_better_than_ce"] = int((v > ce).sum())
        out(stage="label_flip_20_summary", recipe=recipe_name, loss=loss, seeds=list(seeds), **summary)


def neural_cleanse_on_clean(s):
    """False-positive check: Neural Cleanse on the clean baseline model should flag no class under either rule."""
    t0 = time.perf_counter()
    nc = registry.create("repair", "neural_cleanse", anomaly_space="log_l1", unlearn_epochs=0)
    nc.repair(train(s, s.train), clean=s.val, seed=SEED)
    r = nc.report_
    flagged = {"log_l1": r["infected_classes"],
               "l1": [c for c, v in enumerate(r["anomaly_index_other_space"]) if v > nc.anomaly_threshold]}
    out(stage="neural_cleanse_clean_model", trigger_l1=r["trigger_l1"], anomaly_index_log_l1=r["anomaly_index"],
        anomaly_index_l1=r["anomaly_index_other_space"], flagged=flagged, time_s=round(time.perf_counter() - t0, 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("backdoor", "labels", "robust_loss", "nc_clean", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=5, help="robust_loss part: seeds 0..N-1")
    ap.add_argument("--loss-recipe", choices=tuple(LOSS_RECIPES), default="baseline",
                    help="robust_loss part: the recipe every loss (CE included) is trained with")
    ap.add_argument("--scenarios", type=float, nargs="+", default=[0.1, 0.01], help="backdoor poison fractions")
    ap.add_argument("--skip-baseline", action="store_true", help="do not retrain the clean baseline (backdoor part)")
    ap.add_argument("--defenses", nargs="+", default=["spectral_signatures", "activation_clustering", "fine_pruning",
                                                      "neural_cleanse"],
                    choices=[*CLEANSERS, *REPAIRS], help="backdoor part")
    ap.add_argument("--seed", type=int, default=0, help="split, attack, training and defense seed (replicates)")
    args = ap.parse_args()
    global SEED
    SEED = args.seed
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
        backdoor(s, base_acc, tuple(args.scenarios), tuple(args.defenses))
    if args.part in ("labels", "all"):
        labels(s)
    if args.part in ("nc_clean", "all"):
        neural_cleanse_on_clean(s)
    if args.part in ("robust_loss", "all"):
        robust_losses(s, range(args.seeds), args.loss_recipe)


if __name__ == "__main__":
    main()
