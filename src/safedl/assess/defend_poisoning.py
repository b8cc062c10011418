"""Stage handlers for defenses against poisoning and backdoor attacks, scored against the attack's ground truth.

The attack stage's ``outcome.state`` holds the PoisonedDataset (with ``is_poison``), the poisoned model's
state_dict, the attack object, the target class and triggered test images. Every defense is measured on the same
test sets: clean accuracy on the whole test split and, where the attack has a target and triggered test images, the
attack success rate (triggered images of other classes predicted as the target).

- cleanser: tpr, fpr, precision, recall, f1 against ``is_poison``, AUROC of the scores; then the baseline
  architecture is retrained with the baseline recipe and seed on the kept samples.
- trainer: the baseline architecture trained on the poisoned data with the defense's training.
- repair: the poisoned model repaired with the trusted clean set.
- detector: fitted on the trusted clean set with the poisoned model; tpr on triggered test images, fpr on clean ones.
- inspector: diagnostics of the poisoned model (per-class accuracy, weight statistics).
The trusted clean set is always the validation split (``ctx.splits.val``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn

from safedl.assess.context import RunContext
from safedl.assess.handlers import AttackOutcome, defense_handler
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.utils.stats import proportion, scalar
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)
TRUSTED_NOTE = "trusted clean set: the validation split"


def _poisoned_model(ctx: RunContext, state: dict) -> nn.Module:
    m = ctx.build_model()
    m.load_state_dict(state["model_state"])
    return m.eval()


def _outcome_metrics(ctx: RunContext, model: nn.Module, state: dict) -> dict[str, Any]:
    test = ctx.splits.test
    pred = predict(model, test.x.to(ctx.device)).cpu()
    out = {"clean_accuracy_after": proportion(int((pred == test.y).sum()), len(test))}
    xt, target = state.get("test_triggered_x"), state.get("target_class")
    if xt is not None and target is not None and len(xt):
        pt = predict(model, xt.to(ctx.device)).cpu()
        out["attack_success_rate_after"] = proportion(int((pt == target).sum()), len(xt))
    return out


def _auroc(score: torch.Tensor, truth: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    if int(truth.sum()) in (0, len(truth)):
        return float("nan")
    return float(roc_auc_score(truth.numpy(), score.double().numpy()))


def detection_metrics(flag: torch.Tensor, score: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """tpr, fpr, precision, recall, f1 of ``flag`` against ``truth``, AUROC of ``score``."""
    flag, truth = flag.bool().cpu(), truth.bool().cpu()
    tp, fp = int((flag & truth).sum()), int((flag & ~truth).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / pos if pos else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    return {"tpr": proportion(tp, pos), "fpr": proportion(fp, neg), "precision": proportion(tp, tp + fp),
            "recall": proportion(tp, pos), "f1": scalar(f1, n=len(flag)), "auroc": scalar(_auroc(score, truth), n=len(flag))}


# ------------------------------------------------------------------------------------------------ figures

def _grid(path, x: torch.Tensor, titles: list[str], suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _score_histograms(path, score: torch.Tensor, y: torch.Tensor, truth: torch.Tensor, num_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 5
    rows = math.ceil(num_classes / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
    lo, hi = float(score.min()), float(score.max())
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 31).numpy()
    for c, ax in enumerate(axes.ravel()):
        if c >= num_classes:
            ax.axis("off")
            continue
        sel = y == c
        ax.hist(score[sel & ~truth].numpy(), bins=bins, color="tab:blue", alpha=0.7, label="clean")
        if bool((sel & truth).any()):
            ax.hist(score[sel & truth].numpy(), bins=bins, color="tab:red", alpha=0.7, label="poison")
        ax.set_title(f"class {c}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle("outlier scores per class (red: true poisons)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _stem(ctx: RunContext, spec, outcome: AttackOutcome) -> str:
    return f"{spec.key}_vs_{outcome.entry.get('id', outcome.entry.get('name', 'attack'))}"


# ------------------------------------------------------------------------------------------------ handlers

def _train_fn(ctx: RunContext, what: str):
    def fn(data: Dataset, **kw: Any) -> nn.Module:
        return ctx.train_like_baseline(data, description=f"{what}: training", **kw)

    return fn


def _cleanser_call(ctx: RunContext, comp: Any, poisoned: PoisonedDataset, model: nn.Module, notes: list[str]):
    name = comp.registry_name
    kwargs: dict[str, Any] = {"model": model, "trusted": ctx.splits.val, "train_fn": _train_fn(ctx, name),
                              "device": ctx.device}
    if name == "provenance_tracking":
        from safedl.defenses.cleanse.provenance_tracking import build_manifest

        # simulated provenance: the owner signed the pre-attack data, samples spread over 5 sources at random;
        # the attack then tampered with samples after signing
        g = torch.Generator().manual_seed(ctx.seed)
        sources = torch.randint(0, 5, (len(poisoned),), generator=g)
        original = Dataset(poisoned.original_x, poisoned.original_y, poisoned.num_classes)
        key = os.urandom(32)
        kwargs.update(manifest=build_manifest(original, sources, key=key), key=key)
        notes.append("provenance simulated: manifest signed (HMAC-SHA256) over the pre-attack training set, 5 random "
                     "sources; the attack tampers after signing")
    if name in ("data_cleaning", "influence_functions", "provenance_tracking", "roni", "activation_clustering"):
        notes.append(TRUSTED_NOTE if name != "data_cleaning" else
                     "losses from cross-validated models trained with the baseline recipe")
    elif name in ("spectral_signatures",):
        notes.append(TRUSTED_NOTE + " (decides which mode of a class is foreign)")
    return comp.find_poison(poisoned, **kwargs)


@defense_handler("cleanser", "poisoning", "backdoor")
def evaluate_cleanser(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    t_start = time.perf_counter()
    state = outcome.state
    poisoned: PoisonedDataset = state["poisoned"]
    model = _poisoned_model(ctx, state)
    notes: list[str] = []
    t0 = time.perf_counter()
    res = _cleanser_call(ctx, components[0], poisoned, model, notes)
    t_detect = time.perf_counter() - t0
    truth = poisoned.is_poison.cpu()
    metrics: dict[str, Any] = {"detection": detection_metrics(res.is_suspect, res.score, truth),
                               "flagged": scalar(res.n_flagged, n=len(truth)), "detect_time_s": scalar(t_detect)}
    kept = poisoned.subset(res.keep)
    retrained = ctx.train_like_baseline(kept, description=f"{spec.key}: retraining on kept data")
    metrics.update(_outcome_metrics(ctx, retrained, state))
    metrics["poison_remaining"] = proportion(int((truth & res.keep).sum()), int(res.keep.sum()))
    per_class = {"flagged": [int((res.is_suspect & (poisoned.y == c)).sum()) for c in range(poisoned.num_classes)],
                 "true_poison": [int((truth & (poisoned.y == c)).sum()) for c in range(poisoned.num_classes)]}
    artifacts: dict[str, str] = {}
    if ctx.profile.output.figures:
        d = ctx.artifact_dir("defenses")
        stem = _stem(ctx, spec, outcome)
        flagged = torch.nonzero(res.is_suspect).flatten()
        if len(flagged):
            show = flagged[torch.argsort(res.score[flagged], descending=True)][:32]
            titles = [f"y={int(poisoned.y[i])} {'P' if truth[i] else 'clean'}" for i in show]
            p = d / f"{stem}_flagged.png"
            _grid(p, poisoned.x[show].cpu(), titles, f"{spec.key}: highest-scoring flagged samples (P = true poison)")
            artifacts["flagged samples (highest scores)"] = ctx.rel(p)
        p = d / f"{stem}_scores.png"
        _score_histograms(p, res.score, poisoned.y.cpu(), truth, poisoned.num_classes)
        artifacts["outlier scores per class"] = ctx.rel(p)
    info = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    if "poisoned_classes" in info:
        notes.append(f"classes judged poisoned: {info['poisoned_classes']}")
    return {"name": spec.name, "metrics": metrics, "per_class": per_class, "artifacts": artifacts, "notes": notes,
            "info": _jsonable(info), "time_s": time.perf_counter() - t_start}


@defense_handler("trainer", "poisoning", "backdoor")
def evaluate_trainer(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    t_start = time.perf_counter()
    state = outcome.state
    comp = components[0]
    m = ctx.build_model()
    m = comp.fit(m, state["poisoned"], recipe=ctx.recipe, seed=ctx.seed, device=ctx.device, val=ctx.splits.val)
    metrics = _outcome_metrics(ctx, m, state)
    notes = [f"trained on the poisoned data with the baseline recipe ({ctx.recipe.epochs} epochs, seed {ctx.seed})"]
    if hasattr(comp, "epsilon_spent_"):
        metrics["epsilon_spent"] = scalar(comp.epsilon_spent_)
        notes.append(f"DP-SGD: epsilon spent {comp.epsilon_spent_:.3g} (target {comp.target_epsilon}), delta "
                     f"{comp.target_delta}, clip {comp.max_grad_norm}, noise multiplier {comp.noise_multiplier_:.3g}"
                     + ("; BatchNorm replaced by GroupNorm" if comp.batchnorm_replaced_ else ""))
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": {},
            "time_s": time.perf_counter() - t_start}


@defense_handler("repair", "poisoning", "backdoor")
def evaluate_repair(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    t_start = time.perf_counter()
    state = outcome.state
    comp = components[0]
    model = _poisoned_model(ctx, state)
    before = _outcome_metrics(ctx, model, state)
    repaired = comp.repair(model, clean=ctx.splits.val, device=ctx.device, seed=ctx.seed)
    metrics = _outcome_metrics(ctx, repaired, state)
    metrics["clean_accuracy_before"] = before["clean_accuracy_after"]
    if "attack_success_rate_after" in before:
        metrics["attack_success_rate_before"] = before["attack_success_rate_after"]
    report = getattr(comp, "report_", {})
    notes = [TRUSTED_NOTE + " (repair data)"]
    target = state.get("target_class")
    if "infected_classes" in report:
        notes.append(f"classes flagged as infected: {report['infected_classes']} (attack target: {target})")
        if target is not None:
            metrics["target_class_flagged"] = scalar(float(target in report["infected_classes"]))
            if "anomaly_index" in report:
                notes.append(f"anomaly index of class {target} ({report.get('anomaly_space', 'l1')}): "
                             f"{report['anomaly_index'][target]:.2f} (threshold {comp.anomaly_threshold})")
    if "pruned" in report:
        notes.append(f"pruned {report['pruned']} of {report.get('channels', report.get('units'))} units")
    artifacts: dict[str, str] = {}
    if ctx.profile.output.figures and hasattr(comp, "masks_"):
        p = ctx.artifact_dir("defenses") / f"{_stem(ctx, spec, outcome)}_triggers.png"
        x = (comp.masks_ * comp.patterns_).clamp(0, 1)
        _grid(p, x, [f"class {c}: L1 {v:.1f}" for c, v in enumerate(report["trigger_l1"])],
              "reverse-engineered triggers (mask x pattern)")
        artifacts["reverse-engineered triggers"] = ctx.rel(p)
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": artifacts,
            "info": _jsonable(report), "time_s": time.perf_counter() - t_start}


@defense_handler("detector", "poisoning", "backdoor")
def evaluate_detector(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    t_start = time.perf_counter()
    state = outcome.state
    det = components[0]
    model = _poisoned_model(ctx, state)
    det.fit(ctx.splits.val.x.to(ctx.device), model=model, seed=ctx.seed)
    clean = ctx.splits.test.x
    xt = state.get("test_triggered_x")
    s_clean = det.score(clean.to(ctx.device)).cpu()
    fp = int((s_clean > det.threshold_).sum())
    metrics: dict[str, Any] = {"detection": {"fpr": proportion(fp, len(clean))}}
    notes = [TRUSTED_NOTE + " (overlays and threshold calibration)", "fpr on the clean test split"]
    if xt is not None and len(xt):
        s_trig = det.score(xt.to(ctx.device)).cpu()
        tp = int((s_trig > det.threshold_).sum())
        truth = torch.cat([torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_trig), dtype=torch.bool)])
        metrics["detection"].update(tpr=proportion(tp, len(xt)),
                                    auroc=scalar(_auroc(torch.cat([s_clean, s_trig]), truth), n=len(truth)))
        notes.append("tpr on triggered test images of non-target classes")
        # what passes the detector: attack success among unflagged triggered inputs
        target = state.get("target_class")
        if target is not None:
            passed = s_trig <= det.threshold_
            pt = predict(model, xt[passed].to(ctx.device)).cpu() if bool(passed.any()) else torch.empty(0)
            metrics["attack_success_rate_after"] = proportion(int((pt == target).sum()), len(xt))
    metrics["clean_accuracy_after"] = proportion(
        int(((predict(model, clean.to(ctx.device)).cpu() == ctx.splits.test.y) & (s_clean <= det.threshold_)).sum()),
        len(clean))
    notes.append("clean_accuracy_after counts a rejected clean input as an error")
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": {},
            "time_s": time.perf_counter() - t_start}


@defense_handler("inspector", "poisoning", "backdoor")
def evaluate_inspector(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    t_start = time.perf_counter()
    state = outcome.state
    comp = components[0]
    model = _poisoned_model(ctx, state)
    report = comp.inspect(model, data=ctx.splits.test, device=ctx.device)
    metrics: dict[str, Any] = {}
    notes: list[str] = ["diagnostics of the poisoned model; nothing is changed"]
    per_class: dict[str, list] = {}
    artifacts: dict[str, str] = {}
    if "flagged_classes" in report:
        per_class["accuracy"] = report["per_class_accuracy"]
        metrics["flagged_classes"] = scalar(len(report["flagged_classes"]), n=len(report["per_class_accuracy"]))
        notes.append(f"classes below mean - k std: {report['flagged_classes']} (threshold {report['threshold']:.3f})")
    if "flagged_layers" in report:
        metrics["flagged_layers"] = scalar(len(report["flagged_layers"]), n=len(report["layers"]))
        notes.append(f"flagged layers: {report['flagged_layers'] or 'none'}")
        if ctx.profile.output.figures:
            p = ctx.artifact_dir("defenses") / f"{_stem(ctx, spec, outcome)}_weights.png"
            _weight_histograms(p, comp.histograms_)
            artifacts["weight histograms per layer"] = ctx.rel(p)
    return {"name": spec.name, "metrics": metrics, "per_class": per_class, "notes": notes, "artifacts": artifacts,
            "info": _jsonable(report), "time_s": time.perf_counter() - t_start}


def _weight_histograms(path, hist: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(hist)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.0 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        h = hist[name]
        lo, hi = h["range"]
        n = len(h["counts"])
        edges = [lo + (hi - lo) * i / n for i in range(n)]
        ax.bar(edges, h["counts"], width=(hi - lo) / max(n, 1), align="edge")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):
        return obj.item()
    return obj
