"""Generalization grid of the feature-space poison detectors (issue 15): poison they were not developed against.

The detectors (spectral_signatures, activation_clustering) were developed on one scenario: a 3x3 checkerboard in the
bottom-right corner, all-to-one to class 7, mnist5k. This grid varies every axis of that scenario:

- trigger: ``checkerboard`` (BadNets pattern, Gu et al. 2017), ``single_pixel`` (one lit pixel, bottom right),
  ``blended_noise`` (a fixed full-image uniform-noise pattern blended at alpha 0.2, Chen et al. 2017 "Targeted
  Backdoor Attacks on Deep Learning Systems Using Data Poisoning"), ``random_patch`` (a fixed noise patch stamped at
  a fresh random position in every image);
- mapping: ``all_to_one`` (to ``--targets``, default 3: not the development class 7) and ``all_to_all`` (c -> c+1);
- poison rate (share of the training split): 1%, 5%, 10%, 20%;
- data set: mnist5k, digits; seeds.

Per cell: ``stratified_split(load_builtin(DATA), test_fraction=0.2, val_fraction=0.1, seed=SEED)``, the backdoor
(``static_patch`` with the cell's trigger, seed SEED) poisons the training split (or, with ``--poison-before-split``,
the whole data set before splitting, so the validation split is poisoned too: the realistic case), the model is
trained with seed SEED (mnist5k: ``small_cnn``, the baseline ``TrainRecipe()``; digits: ``tiny_cnn``, 15 epochs,
lr 3e-3, no augmentation, as the test suite), and each detector runs on the poisoned training split with
the poisoned model under every ``--trusted`` setting: ``val`` (the validation split as trusted clean set: the
pipeline's current assumption), ``small`` (100 validation images), ``none`` (no trusted data). TPR / FPR carry n and a
95% Wilson interval. The model is retrained on the samples the detector keeps (first trusted setting; ``--retrain
best``: only the detector with the higher TPR - FPR, ``all``: each) and the attack success rate after is measured on
the triggered test images (all-to-one: non-target test images predicted as the target; all-to-all: test images
predicted as their label + 1).

Target (issue 15): in every all-to-one cell at 5-20%, the best detector has TPR >= 0.9, FPR <= 0.05 and ASR after
<= 0.05. Each cell's line says ``target_met`` (None where the target does not apply).

Run (torch single-threaded, CPU; one JSON line per cell on stdout, and to ``--out``):

    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py                 # the full grid (many hours)
    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data mnist5k --seeds 0 \
        --triggers checkerboard single_pixel blended_noise random_patch --rates 0.1 --mappings all_to_one
    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data mnist5k --seeds 0 \
        --triggers checkerboard --rates 0.05 --mappings all_to_one
    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data mnist5k --seeds 0 \
        --triggers checkerboard --rates 0.1 --mappings all_to_all
    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data digits --seeds 0 --rates 0.1 \
        --trusted val none                                         # digits, all four triggers, both mappings
    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data digits --seeds 0 --rates 0.1 \
        --triggers checkerboard random_patch --mappings all_to_one --poison-before-split

Beside them (``--extra``): data_cleaning, neural_cleanse (both anomaly indices), strip, fine_pruning (the default,
prune-only, 5 epochs at 5e-4), isolate_cross_fit (issue 27: NO trusted data under any ``--trusted`` setting; its own
seeded trainings with the cell's recipe, then retrained on what it keeps; ``time_vs_baseline`` = its run time over
one baseline training of the cell). ``--clean``: false alarms on a clean model. ``--summarize FILE``: one line a cell.
Measured cells (JSON lines): bench/results/poison_generalization.jsonl; the known-weak table
(cleanse/_common.FEATURE_SPACE_KNOWN_WEAK) is tied to it by tests/test_defenses_cleanse_generalization.py.

Untrusted column (issue 27; defaults of isolate_cross_fit chosen on digits seed 0, measured on seeds 1-2; 2 shared
cores, so digits/tiny_cnn only, one mnist5k cell): bench/results/poison_generalization_untrusted.jsonl, table in the
README ("Poison without trusted data"), from

    nice -n 10 .venv/bin/python bench/measure_poison_generalization.py --data digits --seeds 1 2 \
        --triggers checkerboard single_pixel blended_noise random_patch --rates 0.1 --mappings all_to_one \
        --trusted val none --extra isolate_cross_fit --out bench/results/poison_generalization_untrusted.jsonl
    (and --seeds 1 --poison-before-split; --seeds 1 --triggers checkerboard blended_noise --mappings all_to_all;
    --seeds 1 2 --triggers blended_noise --rates 0.05 0.2; --seeds 1 --triggers checkerboard --rates 0.01 0.05 0.2;
    --clean --data digits --seeds 1 2)

Second pass (superimposition isolation in isolate_cross_fit; ``--triggers learned_trigger label_consistent`` add
those backdoors): bench/results/poison_generalization_untrusted2.jsonl, README "Poison without trusted data:
superimposition isolation" (digits seeds 0-2, ``--trusted none --extra isolate_cross_fit``).

Measured (mnist5k, small_cnn, all-to-one to class 3 unless said; TPR n = poisons, FPR n = clean training samples;
best of SS/AC with the validation split trusted, retrained; ASR on 900 triggered test images):
- checkerboard 20% (n=700) TPR 1.000 [0.995, 1], FPR 0.000, ASR 1.000 -> 0.000: met. 1% (n=35): 0.971 [0.855,
  0.995], ASR 0.999 -> 0.003 (100 trusted images: 0.000). 10% seeds 1 and 2: TPR 1.000 [0.989, 1], FPR 0.000, ASR
  -> 0.001 / 0.002: met (seed 0: met, issue 15 note); to class 0 (seed 0): 1.000, ASR -> 0.002: met.
- 10%, seeds 1 and 2 (``--seeds 1 2 --triggers single_pixel blended_noise --rates 0.1 --mappings all_to_one
  --trusted val --extra``): single pixel seed 1 SS 1.000 [0.989, 1], ASR -> 0.002: met; seed 2 AC 0.891 [0.854,
  0.920], SS 0.437, ASR -> 0.149: NOT met; blended noise seeds 1 / 2 AC 0.994 / 1.000, ASR -> 0.001 / 0.004: met.
- random patch 10%, seeds 1 / 2: SS 0.786 [0.740, 0.825] / AC 0.729 [0.680, 0.772], ASR 0.321 -> 0.039 / 0.436 ->
  0.080: NOT met. Checkerboard 10% to class 8 (seed 0): SS 1.000, ASR -> 0.002: met. All-to-all 10% (seed 0):
  single pixel SS 0.920 [0.887, 0.944], ASR 0.882 -> 0.054; blended noise SS 0.997, ASR 0.933 -> 0.001.
- 5%: single pixel 1.000 [0.979, 1], ASR 0.998 -> 0.000: met. blended noise SS 0.949 [0.905, 0.973], FPR 0.003,
  ASR 1.000 -> 0.067: NOT met (the 9 missed poisons keep the backdoor). random patch: the backdoor is weak (ASR
  0.097) and SS/AC find none (0.000 [0, 0.021]; 0.909 with 100 trusted images): NOT met. 10% random patch
  (reproduced): SS 0.774 [0.728, 0.815], ASR 0.297 -> 0.023: NOT met.
- all-to-all checkerboard 10% (reproduced): ASR 0.926 (n=1000); SS 0.997 [0.984, 0.999], FPR 0.001, ASR -> 0.000;
  100 trusted images: 0.000; none: 0.997. STRIP finds none of its triggered inputs (TPR 0.000, FPR 0.011).
- no trusted data: TPR 0.000 at 10-20% (checkerboard seeds 0-1, 20%) except seed 2 and target 0 (1.000); at 5%: 1.000 for
  checkerboard/single pixel, 0.000 for blended noise and random patch.
- poison spread before splitting (10%, n=353): checkerboard and blended noise TPR 0.000 with any trusted setting;
  STRIP (checkerboard TPR 0.000, blended 0.304) and fine-pruning (ASR 1.000) calibrated on the poisoned split fail.
- STRIP (1% FPR target; validation split): checkerboard 10% seeds 1-2 TPR 1.000, FPR 0.009 / 0.007; single pixel
  5% 0.991; blended 5% 0.961; random patch 0.008 (5%) / 0.051 (10%).
- fine-pruning default ASR after: 0.060 (single pixel 5%), 0.073 / 0.036 (checkerboard seeds 1-2), 0.014 (blended
  5%), 0.011 / 0.024 (random patch 5% / 10%), 0.271 (checkerboard to class 0); prune-only 0.15-0.998; 5 epochs
  at 5e-4 0.03-0.99.
- digits (tiny_cnn, 10%, n=126): SS/AC met the target in 1 of 11 all-to-one cells (seed 2 checkerboard to 8: TPR
  1.000, ASR -> 0.028); elsewhere TPR 0.000-0.976 (see the results file); data_cleaning (5 folds) TPR 0.127 /
  0.690 / 0.841 at FPR 0.131 / 0.092 / 0.069 (checkerboard / blended / random patch, seed 0); Neural Cleanse and
  fine-pruning: see their docstrings. Clean digits models (seeds 0-4): SS/AC flag 0-3.3% of the training set.
Commands (each with ``--out FILE``, resumable): ``--data mnist5k --seeds 0 --triggers checkerboard --rates 0.2 0.01
--mappings all_to_one --extra``; ``--data mnist5k --extra strip fine_pruning`` with ``--seeds 0 --triggers
single_pixel blended_noise random_patch --rates 0.05 --mappings all_to_one``, ``--seeds 1`` / ``--seeds 2 --triggers
checkerboard --rates 0.1 --mappings all_to_one``, ``--seeds 0 --triggers random_patch --rates 0.1 --mappings
all_to_one``, and ``--poison-before-split --triggers checkerboard`` / ``blended_noise --rates 0.1``; digits:
``--data digits --trusted val --extra neural_cleanse strip fine_pruning --seeds 1 2 --triggers checkerboard
blended_noise --rates 0.1 --mappings all_to_one --targets 0 8`` (and ``--seeds 0 --triggers single_pixel
blended_noise random_patch --targets 3``; ``--seeds 0 --triggers checkerboard --mappings all_to_all``), ``--data
digits --trusted val --extra data_cleaning --retrain all --seeds 0 --triggers checkerboard blended_noise
random_patch --rates 0.1 --mappings all_to_one``, ``--clean --data digits --seeds 0 1 2 3 4``.
Not run (2 shared cores, load 5-12 during the runs; a mnist5k cell took 15-25 minutes, Neural Cleanse about 20 more):
targets 0 and 8 and all-to-all for the other triggers on mnist5k, seeds 1-2 of the other triggers, 20% and 1% of
the other triggers, Neural Cleanse and data_cleaning on mnist5k cells.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.data.dataset import Dataset, PoisonedDataset, Splits
from safedl.evaluate.cleanse_safeguard import per_class_accuracy, whole_mode_classes
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.stats import proportion
from safedl.utils.tensors import predict, seed_everything

log = logging.getLogger("poison_generalization")

DETECTORS = ("spectral_signatures", "activation_clustering")
#: rows beside the two feature-space cleansers (``--extra``): data_cleaning (cleanser, cross-validated losses, no
#: trusted data), neural_cleanse (repair: reversed triggers, anomaly index in both spaces, unlearning), strip
#: (detector on triggered test inputs), fine_pruning (repair; the default next to prune-only and a gentler
#: fine-tuning). The repairs and STRIP use the first trusted setting (skipped when it is ``none``).
EXTRAS = ("data_cleaning", "neural_cleanse", "strip", "fine_pruning", "isolate_cross_fit")
FINE_PRUNING_VARIANTS = {"default": {}, "prune_only": {"epochs": 0}, "epochs5_lr5e-4": {"epochs": 5, "lr": 5e-4}}
TRUSTED = ("val", "small", "none")
SMALL_TRUSTED = 100
MAPPINGS = ("all_to_one", "all_to_all")


def trigger_params(name: str, image_side: int) -> dict[str, Any]:
    """static_patch parameters of a named trigger for square images of side ``image_side``."""
    patch = max(2, image_side // 7)  # 4 px on 28x28, 2 px on 8x8
    table = {
        "checkerboard": {"trigger": "pattern", "patch_size": 3, "position": "bottom_right"},
        "single_pixel": {"trigger": "single_pixel", "position": "bottom_right"},
        "blended_noise": {"trigger": "random_noise", "patch_size": None, "blend_alpha": 0.2},  # Chen et al. 2017
        "random_patch": {"trigger": "random_noise", "patch_size": patch, "position": "random"},
    }
    return table[name]


#: other backdoors (issue 27): ``learned_trigger`` (a patch optimised against a clean surrogate, dirty label, all-to-one
#: only) and ``label_consistent`` (Turner et al. 2019: PGD-hardened target-class images stamped with the checkerboard,
#: labels kept; ``rate`` = poisons over the training split, i.e. ``class_fraction`` = rate x N / N_target)
OTHER_BACKDOORS = ("learned_trigger", "label_consistent")
TRIGGER_NAMES = ("checkerboard", "single_pixel", "blended_noise", "random_patch") + OTHER_BACKDOORS


@dataclass(frozen=True)
class Cell:
    data: str
    seed: int
    trigger: str
    rate: float
    mapping: str
    target: int

    def row(self) -> dict[str, Any]:
        return {"data": self.data, "seed": self.seed, "trigger": self.trigger, "rate": self.rate,
                "mapping": self.mapping, "target": self.target if self.mapping == "all_to_one" else None}


def cell_key(row: dict[str, Any]) -> tuple:
    """What identifies a measured cell in the JSON lines (resuming skips cells already in ``--out``)."""
    return (row["data"], row["seed"], row["trigger"], float(row["rate"]), row["mapping"], row["target"],
            bool(row.get("poison_before_split", False)))


#: model and recipe per data set: mnist5k as the default profile; digits (8x8) as the test suite's tiny model (a 2-pixel
#: shift augmentation on 8x8 images leaves small_cnn near 55% accuracy)
SETUPS = {
    "mnist5k": ("small_cnn", TrainRecipe()),
    "digits": ("tiny_cnn", TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none")),
}


def train(s: Splits, data: Dataset, seed: int, data_name: str, **kw: Any) -> torch.nn.Module:
    arch, recipe = SETUPS[data_name]
    seed_everything(seed)
    m = with_normalization(build_model(arch, in_channels=data.shape[0], num_classes=data.num_classes,
                                       image_size=data.shape[1]), s.mean, s.std)
    train_model(m, data, recipe=recipe, seed=seed, **kw)
    return m.eval()


def make_attack(cell: Cell, image_side: int, *, full: Dataset | None = None):
    """The cell's backdoor; ``full`` (the data set poisoned) sets the label-consistent attack's class share."""
    if cell.trigger == "learned_trigger":
        return registry.create("backdoor", "learned_trigger", target_class=cell.target, poison_fraction=cell.rate,
                               label_mode="dirty", seed=cell.seed)
    if cell.trigger == "label_consistent":
        share = cell.rate * len(full) / int((full.y == cell.target).sum()) if full is not None else 0.5
        return registry.create("poisoning", "label_consistent_backdoor", target_class=cell.target,
                               class_fraction=min(1.0, share), seed=cell.seed)
    return registry.create("backdoor", "static_patch", target_class=cell.target, poison_fraction=cell.rate,
                           label_mode="dirty", mapping=cell.mapping, seed=cell.seed,
                           **trigger_params(cell.trigger, image_side))


def poisoned_splits(cell: Cell, before_split: bool) -> tuple[Splits, PoisonedDataset, Any]:
    """The splits and the poisoned training set; with ``before_split`` every split may hold poison."""
    full = load_builtin(cell.data)
    atk = make_attack(cell, full.shape[1], full=full)
    g = torch.Generator().manual_seed(cell.seed)
    if not before_split:
        s = stratified_split(full, test_fraction=0.2, val_fraction=0.1, seed=cell.seed)
        return s, atk.poison(s.train, generator=g), atk
    p_full = atk.poison(full, generator=g)
    s = stratified_split(p_full, test_fraction=0.2, val_fraction=0.1, seed=cell.seed)  # subsets keep ground truth
    t = s.test  # the test split is measured on its clean originals
    s.test = Dataset(t.original_x, t.original_y, t.num_classes, t.name, t.class_names)
    return s, s.train, atk


def aimed(cell: Cell, atk, test: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered test images and the label the backdoor sends each to (from the clean test images)."""
    keep = test.y != cell.target if cell.mapping == "all_to_one" else torch.ones_like(test.y, dtype=torch.bool)
    x = atk.apply_trigger(test.x[keep])
    if cell.trigger == "label_consistent":  # all-to-one by construction, no backdoor_labels
        return x, torch.full_like(test.y[keep], cell.target)
    return x, atk.backdoor_labels(test.y[keep], test.num_classes)


def asr(model: torch.nn.Module, x: torch.Tensor, want: torch.Tensor) -> dict:
    return proportion(int((predict(model, x) == want).sum()), len(x))


def accuracy(model: torch.nn.Module, test: Dataset) -> dict:
    return proportion(int((predict(model, test.x) == test.y).sum()), len(test))


def nc_row(cell: Cell, model, trusted: Dataset, test: Dataset, xt, want) -> dict[str, Any]:
    """Neural Cleanse (default: log-space anomaly index) with the paper's L1 index beside it (Wang et al. 2019)."""
    rep = registry.create("repair", "neural_cleanse")
    repaired = rep.repair(model, clean=trusted, seed=cell.seed)
    r, thr = rep.report_, rep.report_["anomaly_threshold"]
    spaces = {r["anomaly_space"]: r["anomaly_index"], "l1" if r["anomaly_space"] != "l1" else "log_l1":
              r["anomaly_index_other_space"]}
    out: dict[str, Any] = {"trigger_l1": r["trigger_l1"], "asr_after": asr(repaired, xt, want),
                           "clean_accuracy_after": accuracy(repaired, test)}
    for space, idx in spaces.items():
        flagged = [c for c, v in enumerate(idx) if v > thr]
        d = {"index": idx, "flagged": flagged}
        if cell.mapping == "all_to_one":
            d["target_index"] = idx[cell.target]
            d["max_other_index"] = max(v for c, v in enumerate(idx) if c != cell.target)
            d["target_flagged"] = cell.target in flagged
            d["only_target"] = flagged == [cell.target]
        out[space] = d
    return out


def strip_row(cell: Cell, model, trusted: Dataset, test: Dataset, xt, want) -> dict[str, Any]:
    """STRIP (Gao et al. 2019): FPR on the clean test split, TPR on triggered test inputs, ASR of what passes."""
    from types import SimpleNamespace

    from safedl.evaluate.defend_poisoning import _triggered_detection

    det = registry.create("detector", "strip")
    det.fit(trusted.x, model=model, seed=cell.seed)
    s_clean = det.score(test.x).cpu()
    r = _triggered_detection(model, det, s_clean, xt, want, SimpleNamespace(device=torch.device("cpu")))
    return {"tpr": r["detection"]["tpr"], "fpr": proportion(int((s_clean > det.threshold_).sum()), len(test)),
            "auroc": r["detection"]["auroc"]["value"], "asr_after": r["asr"]}


def fine_pruning_rows(cell: Cell, model, trusted: Dataset, test: Dataset, xt, want) -> dict[str, Any]:
    """Fine-pruning (Liu et al. 2018): the defaults next to prune-only and 5 epochs at 5e-4."""
    out = {}
    for name, params in FINE_PRUNING_VARIANTS.items():
        rep = registry.create("repair", "fine_pruning", **params)
        m = rep.repair(model, clean=trusted, seed=cell.seed)
        out[name] = {"pruned": rep.report_.get("pruned"), "asr_after": asr(m, xt, want),
                     "clean_accuracy_after": accuracy(m, test)}
    return out


def untrusted_row(cell: Cell, s: Splits, p: PoisonedDataset, xt, want, m) -> dict[str, Any]:
    """isolate_cross_fit with NO trusted data (its own seeded trainings), then retrained on what it keeps; its time
    next to one baseline training's."""
    t0 = time.perf_counter()
    train(s, p, cell.seed, cell.data)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = registry.create("cleanser", "isolate_cross_fit", seed=cell.seed).find_poison(
        p, model=m, train_fn=lambda d, **kw: train(s, d, cell.seed, cell.data, **kw))
    t_det = time.perf_counter() - t0
    f, t = res.is_suspect.bool(), p.is_poison.bool()
    m2 = train(s, p.subset(res.keep), cell.seed, cell.data)
    return {"tpr": proportion(int((f & t).sum()), int(t.sum())), "fpr": proportion(int((f & ~t).sum()), int((~t).sum())),
            "flagged": int(f.sum()), "poisoned_classes": res.info["poisoned_classes"], "asr_after": asr(m2, xt, want),
            "clean_accuracy_after": accuracy(m2, s.test), "time_vs_baseline": round(t_det / max(t_base, 1e-9), 2),
            "per_class": res.info["per_class"],
            "whole_mode": whole_mode_classes(flagged=res.is_suspect, labels=p.y, acc_before=per_class_accuracy(
                m, s.test), acc_after=per_class_accuracy(m2, s.test))}


def extra_rows(cell: Cell, extras: list[str], *, s: Splits, p: PoisonedDataset, m, trusted: Dataset | None, xt,
               want) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in extras:
        t0 = time.perf_counter()
        if name == "data_cleaning":
            res = registry.create("cleanser", name).find_poison(
                p, train_fn=lambda d, **kw: train(s, d, cell.seed, cell.data))
            f, t = res.is_suspect.bool(), p.is_poison.bool()
            row = {"tpr": proportion(int((f & t).sum()), int(t.sum())),
                   "fpr": proportion(int((f & ~t).sum()), int((~t).sum()))}
        elif name == "isolate_cross_fit":
            row = untrusted_row(cell, s, p, xt, want, m)
        elif trusted is None:
            continue
        else:
            fn = {"neural_cleanse": nc_row, "strip": strip_row, "fine_pruning": fine_pruning_rows}[name]
            row = fn(cell, m, trusted, s.test, xt, want)
        row["time_s"] = round(time.perf_counter() - t0, 1)
        out[name] = row
        log.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("index", "trigger_l1")})
    return out


def trusted_set(name: str, val: Dataset, seed: int) -> Dataset | None:
    if name == "none":
        return None
    if name == "small":
        g = torch.Generator().manual_seed(seed)
        return val.subset(torch.randperm(len(val), generator=g)[:SMALL_TRUSTED].sort().values)
    return val


def detect(name: str, data: PoisonedDataset, model, trusted: Dataset | None) -> tuple[Any, dict]:
    t0 = time.perf_counter()
    res = registry.create("cleanser", name).find_poison(data, model=model, trusted=trusted)
    f, t = res.is_suspect.bool(), data.is_poison.bool()
    tp, fp = int((f & t).sum()), int((f & ~t).sum())
    return res, {"tpr": proportion(tp, int(t.sum())), "fpr": proportion(fp, int((~t).sum())),
                 "flagged": int(f.sum()), "poisoned_classes": res.info.get("poisoned_classes"),
                 "time_s": round(time.perf_counter() - t0, 1)}


def target_met(cell: Cell, best: dict | None) -> bool | None:
    if cell.mapping != "all_to_one" or not 0.05 <= cell.rate <= 0.2 or best is None or "asr_after" not in best:
        return None
    return (best["tpr"]["value"] >= 0.9 and best["fpr"]["value"] <= 0.05
            and best["asr_after"]["value"] <= 0.05)


def run_cell(cell: Cell, *, trusted: list[str], retrain: str, before_split: bool,
             extras: list[str] = ()) -> dict[str, Any]:
    t0 = time.perf_counter()
    s, p, atk = poisoned_splits(cell, before_split)
    xt, want = aimed(cell, atk, s.test)
    m = train(s, p, cell.seed, cell.data)
    row: dict[str, Any] = {**cell.row(), "poison_before_split": before_split, "n_train": len(p),
                           "n_poison": p.n_poison, "clean_accuracy": proportion(int((predict(m, s.test.x) == s.test.y)
                                                                                       .sum()), len(s.test)),
                           "asr_before": asr(m, xt, want), "trusted": trusted[0], "detectors": {}}
    keeps: dict[str, torch.Tensor] = {}
    for name in DETECTORS:
        row["detectors"][name] = {}
        for k, tname in enumerate(trusted):
            res, det = detect(name, p, m, trusted_set(tname, s.val, cell.seed))
            row["detectors"][name][tname] = det
            if k == 0:
                keeps[name] = res.keep
    primary = trusted[0]
    ranked = sorted(DETECTORS, key=lambda d: -(row["detectors"][d][primary]["tpr"]["value"] or 0.0)
                    + (row["detectors"][d][primary]["fpr"]["value"] or 0.0))
    for name in (ranked[:1] if retrain == "best" else DETECTORS if retrain == "all" else ()):
        m2 = train(s, p.subset(keeps[name]), cell.seed, cell.data)
        d = row["detectors"][name][primary]
        d["asr_after"] = asr(m2, xt, want)
        d["clean_accuracy_after"] = proportion(int((predict(m2, s.test.x) == s.test.y).sum()), len(s.test))
    row["extra"] = extra_rows(cell, list(extras), s=s, p=p, m=m, trusted=trusted_set(primary, s.val, cell.seed),
                              xt=xt, want=want)
    row["best"] = ranked[0]
    row["target_met"] = target_met(cell, row["detectors"][ranked[0]][primary])
    row["time_s"] = round(time.perf_counter() - t0, 1)
    return row


def clean_row(data_name: str, seed: int) -> dict[str, Any]:
    """False alarms on a clean model (no poison): Neural Cleanse's flagged classes under both anomaly indices
    (validation split as clean set, no unlearning) and the share of clean training samples SS / AC flag."""
    full = load_builtin(data_name)
    s = stratified_split(full, test_fraction=0.2, val_fraction=0.1, seed=seed)
    m = train(s, s.train, seed, data_name)
    row: dict[str, Any] = {"data": data_name, "seed": seed, "clean_model": True,
                           "clean_accuracy": accuracy(m, s.test), "detectors": {}}
    for name in DETECTORS:
        res = registry.create("cleanser", name).find_poison(s.train, model=m, trusted=s.val)
        row["detectors"][name] = {"fpr": proportion(int(res.is_suspect.sum()), len(s.train)),
                                  "poisoned_classes": res.info.get("poisoned_classes")}
    icf = registry.create("cleanser", "isolate_cross_fit", seed=seed).find_poison(
        s.train, model=m, train_fn=lambda d, **kw: train(s, d, seed, data_name, **kw))
    row["detectors"]["isolate_cross_fit"] = {"fpr": proportion(int(icf.is_suspect.sum()), len(s.train)),
                                             "poisoned_classes": icf.info["poisoned_classes"]}
    nc = registry.create("repair", "neural_cleanse", unlearn_epochs=0)
    nc.repair(m, clean=s.val, seed=seed)
    r, thr = nc.report_, nc.anomaly_threshold
    other = "l1" if r["anomaly_space"] != "l1" else "log_l1"
    row["neural_cleanse"] = {r["anomaly_space"]: {"index": r["anomaly_index"], "flagged": r["infected_classes"]},
                             other: {"index": r["anomaly_index_other_space"],
                                     "flagged": [c for c, v in enumerate(r["anomaly_index_other_space"]) if v > thr]}}
    log.info("clean %s seed %d: %s", data_name, seed, row)
    return row


def _p(d: dict | None, ci: bool = False) -> str:
    if not d or d.get("value") is None:
        return "-"
    v = f"{d['value']:.3f}"
    return f"{v} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if ci else v


def summary_line(row: dict[str, Any]) -> str:
    """One compact line per measured cell (``--summarize``): setting, ASR before, best of SS/AC (TPR with its
    interval, FPR, ASR after) and target met, then the extra rows."""
    if row.get("clean_model"):
        nc = row["neural_cleanse"]
        return (f"{row['data']} s{row['seed']} CLEAN model: SS flags {_p(row['detectors']['spectral_signatures']['fpr'])}"
                f" AC {_p(row['detectors']['activation_clustering']['fpr'])}"
                f" ICF {_p(row['detectors'].get('isolate_cross_fit', {}).get('fpr'), True)}; NC flags log {nc['log_l1']['flagged']}"
                f" L1 {nc['l1']['flagged']}")
    where = (f"{row['data']} s{row['seed']} {row['trigger']} {row['rate']:.0%} "
             f"{'a2a' if row['mapping'] == 'all_to_all' else 't' + str(row['target'])}"
             f"{' before-split' if row.get('poison_before_split') else ''}")
    parts = [where, f"ASR {_p(row['asr_before'])} (n={row['asr_before']['n']})"]
    for tname in ("val", "small", "none"):
        dets = {d: r[tname] for d, r in row["detectors"].items() if tname in r}
        if not dets:
            continue
        best = max(dets, key=lambda d: (dets[d]["tpr"]["value"] or 0) - (dets[d]["fpr"]["value"] or 0))
        b = dets[best]
        txt = (f"{tname}: {'SS' if best == 'spectral_signatures' else 'AC'} TPR {_p(b['tpr'], tname == 'val')} "
               f"(n={b['tpr']['n']}) FPR {_p(b['fpr'])}")
        if "asr_after" in b:
            txt += f" ASR->{_p(b['asr_after'])}"
        parts.append(txt)
    parts.append(f"met={row.get('target_met')}")
    ex = row.get("extra", {})
    if "neural_cleanse" in ex:
        nc = ex["neural_cleanse"]
        idx = "/".join(f"{nc[sp].get('target_index', '-')}" for sp in ("log_l1", "l1"))
        parts.append(f"NC log/L1 flags {nc['log_l1']['flagged']}/{nc['l1']['flagged']} tgt idx {idx} "
                     f"ASR->{_p(nc['asr_after'])} acc {_p(nc['clean_accuracy_after'])}")
    if "strip" in ex:
        st = ex["strip"]
        parts.append(f"STRIP TPR {_p(st['tpr'])} FPR {_p(st['fpr'])} ASR->{_p(st['asr_after'])}")
    if "fine_pruning" in ex:
        fp = ex["fine_pruning"]
        parts.append("FP " + " ".join(f"{k} ASR->{_p(fp[k]['asr_after'])} acc {_p(fp[k]['clean_accuracy_after'])}"
                                      for k in FINE_PRUNING_VARIANTS if k in fp))
    if "isolate_cross_fit" in ex:
        u = ex["isolate_cross_fit"]
        parts.append(f"ICF(no trusted) TPR {_p(u['tpr'], True)} (n={u['tpr']['n']}) FPR {_p(u['fpr'])} "
                     f"ASR->{_p(u['asr_after'])} acc {_p(u['clean_accuracy_after'])} x{u['time_vs_baseline']}"
                     + (f" WHOLE-MODE {[d['class'] for d in u['whole_mode']]}" if u.get("whole_mode") else ""))
    if "data_cleaning" in ex:
        parts.append(f"DC TPR {_p(ex['data_cleaning']['tpr'])} FPR {_p(ex['data_cleaning']['fpr'])}")
    return " | ".join(parts)


def cells(args: argparse.Namespace) -> list[Cell]:
    out: list[Cell] = []
    for data, seed, trig, rate, mapping, target in itertools.product(args.data, args.seeds, args.triggers, args.rates,
                                                                    args.mappings, args.targets):
        cell = Cell(data, seed, trig, rate, mapping, target if mapping == "all_to_one" else args.targets[0])
        if cell not in out:  # all-to-all cells have no target: one per target list
            out.append(cell)
    return out


def done_keys(path: str | None) -> set[tuple]:
    """Cells already measured in ``path`` (one JSON object a line)."""
    import os

    if not path or not os.path.exists(path):
        return set()
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {cell_key(r) for r in rows if not r.get("clean_model")}  # clean-model rows (--clean) are not cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["mnist5k", "digits"], choices=("mnist5k", "digits"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--triggers", nargs="+", default=list(TRIGGER_NAMES), choices=TRIGGER_NAMES)
    ap.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.05, 0.1, 0.2])
    ap.add_argument("--mappings", nargs="+", default=list(MAPPINGS), choices=MAPPINGS)
    ap.add_argument("--targets", nargs="+", type=int, default=[3],
                    help="all-to-one target classes (7 was the development class)")
    ap.add_argument("--trusted", nargs="+", default=list(TRUSTED), choices=TRUSTED,
                    help="trusted clean set settings; the first one is used for retraining")
    ap.add_argument("--retrain", choices=("best", "all", "none"), default="best")
    ap.add_argument("--poison-before-split", action="store_true",
                    help="poison the whole data set before splitting (the validation split is poisoned too)")
    ap.add_argument("--extra", nargs="*", default=list(EXTRAS), choices=EXTRAS,
                    help="rows beside spectral signatures / activation clustering (data_cleaning costs n_folds "
                         "trainings per cell)")
    ap.add_argument("--summarize", nargs="+", metavar="JSONL", help="print one compact line per cell of these files")
    ap.add_argument("--clean", action="store_true",
                    help="instead of the grid: false alarms on a clean model per data set and seed (Neural Cleanse "
                         "under both anomaly indices, SS / AC flag shares)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file; cells already in it are "
                                                "skipped (resumable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from safedl.utils.progress import set_enabled

    set_enabled(False)
    if args.summarize:
        for path in args.summarize:
            with open(path) as fh:
                for line in fh:
                    if line.strip():
                        print(summary_line(json.loads(line)))
        return
    if args.clean:
        for data_name, seed in itertools.product(args.data, args.seeds):
            line = json.dumps(clean_row(data_name, seed), default=str)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
        return
    done = done_keys(args.out)
    todo = [c for c in cells(args) if cell_key({**c.row(), "poison_before_split": args.poison_before_split})
            not in done]
    log.info("%d cells to run (%d already in %s)", len(todo), len(done), args.out)
    for i, cell in enumerate(todo):
        log.info("cell %d/%d: %s", i + 1, len(todo), cell)
        line = json.dumps(run_cell(cell, trusted=args.trusted, retrain=args.retrain,
                                   before_split=args.poison_before_split, extras=args.extra), default=str)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
