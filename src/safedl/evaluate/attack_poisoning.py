"""Stage handler for poisoning and backdoor attacks: poison the training set, retrain exactly like the baseline,
and report baseline and poisoned numbers side by side.

Honest rule: the poisoned model is built by ``ctx.build_model()`` and trained by ``ctx.train_like_baseline`` (the
baseline's architecture, recipe and seed), so it differs from the baseline only by the data; with
``training.mode: finetune`` it is the clean baseline fine-tuned on the new samples (``evaluate/finetune.py``).

Attacks that optimise against a model (``fit`` method: clean-label, learned trigger) get a surrogate trained on the
clean training set: with ``threat_model.model_access == "white-box"`` the clean baseline itself (the attacker knows
the model), otherwise an attacker-trained copy of the architecture with the baseline recipe but another seed.

``AttackOutcome.state`` (what poisoning defenses consume):
  poisoned            the PoisonedDataset (exact ground truth: is_poison, original_x / original_y, info)
  model_state         the poisoned model's state_dict (cpu)
  attack              the attack object (``apply_trigger`` for backdoors; picklable)
  target_class        the class the attack pushes inputs to (None for untargeted flipping and for all-to-all
                      backdoors, which have no single target)
  test_triggered_x    test inputs the attack aims at, whose true class is not the label they are aimed at (cpu):
                      triggered test images for backdoors (all-to-one: those of other classes than the target;
                      all-to-all: every test image); the unmodified source-class images for targeted label
                      flipping; the victim instances for feature collision; None when the attack aims at no input
                      (fully_random)
  test_triggered_y    their true labels
  test_triggered_aim  the label each aimed input is sent to: the target class, or ``(y + 1) mod C`` for an
                      all-to-all backdoor (Gu et al. 2017 Sec. 4); attack success = prediction equals it
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from safedl.evaluate.context import RunContext
from safedl.evaluate.base import AttackOutcome, attack_evaluator
from safedl.evaluate.canary import canary_changes, canary_records
from safedl.evaluate.finetune import train_poisoned
from safedl.attacks.poisoning.visibility import visibility
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.models.train import train_model
from safedl.profile import AttackSpec
from safedl.report.stage_figures import attacked_inputs_figure, poison_examples_figure, trigger_figure
from safedl.utils.confusion import confusion_counts
from safedl.utils.bits import pack as pack_bits
from safedl.utils.stats import mean_metric, proportion, scalar
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)


@attack_evaluator("poisoning")
@attack_evaluator("backdoor")
def run_poisoning_attack(ctx: RunContext, spec: AttackSpec, attack: Any) -> AttackOutcome:
    """Poison ``ctx.splits.train`` (generator seeded from ``ctx.seed``), retrain like the baseline, measure."""
    t0 = time.perf_counter()
    category = getattr(attack, "registry_kind", "poisoning")
    train, test = ctx.splits.train, ctx.splits.test
    notes: list[str] = []

    if hasattr(attack, "fit"):
        _fit_on_surrogate(ctx, attack, notes)

    gen = torch.Generator().manual_seed(int(ctx.seed))
    poisoned, poisoned_val = poison_stage_data(ctx, attack, gen, notes)
    model, finetune = train_poisoned(ctx, poisoned, description=f"training on poisoned data ({spec.key})", notes=notes)

    dev = ctx.device
    pred_b = predict(ctx.baseline, test.x.to(dev)).cpu()
    pred_p = predict(model, test.x.to(dev)).cpu()
    k = test.num_classes
    acc_b, acc_p = _per_class(pred_b, test.y, k), _per_class(pred_p, test.y, k)
    metrics: dict[str, Any] = {
        "clean_accuracy": proportion(int((pred_p == test.y).sum()), len(test)),
        "baseline": {"clean_accuracy": proportion(int((pred_b == test.y).sum()), len(test))},
    }
    metrics["clean_accuracy_drop"] = scalar(metrics["baseline"]["clean_accuracy"]["value"]
                                            - metrics["clean_accuracy"]["value"], n=len(test))
    drops = [None if b is None or p is None else b - p for b, p in zip(acc_b, acc_p)]
    per_class: dict[str, list[float | None]] = {"clean_accuracy_baseline": acc_b, "clean_accuracy_poisoned": acc_p,
                                         "accuracy_drop": drops}
    finite = [d for d in drops if d is not None]
    metrics["per_class_drop_max"] = scalar(max(finite) if finite else float("nan"))

    info = poisoned.info
    target = info.get("target_class")
    x_aim, y_aim, aim = _aimed_inputs(attack, info, test, target)
    if x_aim is not None:
        _success_metrics(ctx, model, info, x_aim, y_aim, aim, metrics, per_class, notes)
        if "flip_map" in info and info.get("strategy") == "many_to_one" and info.get("flip_rate") is not None:
            notes.append(f"poison fraction: flip_rate {info['flip_rate']:g} of each source class (every class but "
                         f"{_class_label(test, int(target))}) is flipped, so {poisoned.poison_fraction:.3f} of the "
                         "whole training set is poisoned")

    metrics["poison"] = _poison_metrics(poisoned, target)
    canaries = canary_records(ctx.profile.canary_records, ctx.splits)
    if canaries is not None:  # would the canary check have caught this retraining?
        changed = canary_changes(ctx.baseline, model, canaries[0], device=dev)
        metrics["canary_changes"] = proportion(len(changed), len(canaries[0]))
        notes.append(f"canary records: {len(changed)} of {len(canaries[0])} predictions changed from the clean "
                     "model's (canary_records)")
    if finetune is not None:
        metrics["finetune"] = {k_: scalar(v) for k_, v in finetune.items() if isinstance(v, (int, float))}
    metrics["visibility"] = _visibility_metrics(poisoned)
    for key in ("linf_budget", "opacity"):
        if key in info:
            notes.append(f"{key.replace('_', ' ')}: {info[key]}")
    if info.get("surrogate_success") is not None:
        notes.append(f"the learned trigger alone sends {info['surrogate_success']:.1%} of non-target images to the "
                     "target on the surrogate (before any poisoning)")

    artifacts = _save_artifacts(ctx, spec, attack, poisoned, model, x_aim, aim)
    entry = {"name": spec.name, "id": spec.key, "category": category, "params": dict(spec.params),
             "metrics": metrics, "per_class": per_class, "artifacts": artifacts, "notes": notes,
             "time_s": time.perf_counter() - t0}
    # per test image: the poisoned model is correct; per aimed input: it predicts its aimed label (paired comparisons)
    entry["per_image"] = {"clean_correct": pack_bits(pred_p == test.y)}
    entry["confusion"] = confusion_counts(pred_p, test.y, k)  # the poisoned model on the clean test split
    if x_aim is not None:
        entry["per_image"]["hit"] = pack_bits(predict(model, x_aim.to(dev)).cpu() == aim)
    state = {"poisoned": poisoned, "poisoned_val": poisoned_val, "model_state": {k_: v.detach().cpu() for k_, v in model.state_dict().items()},
             "attack": attack, "target_class": None if target is None else int(target),
             "test_triggered_x": None if x_aim is None else x_aim.cpu(),
             "test_triggered_y": None if y_aim is None else y_aim.cpu(),
             "test_triggered_aim": None if aim is None else aim.cpu()}
    return AttackOutcome(entry=entry, state=state)


def poison_stage_data(ctx: RunContext, attack: Any, gen: torch.Generator,
                      notes: list[str]) -> tuple[PoisonedDataset, PoisonedDataset | None]:
    """The poisoned training split (and, poisoned before the split, the poisoned validation split).

    ``threat_model.poison_stage: after_split`` (default): only the training split is poisoned. ``before_split``:
    the attacker poisons the training and validation data together (the test split, carved first as the
    evaluation hold-out of ``dataset.holdout_fraction``, stays clean), so poison lands in both splits.
    """
    train, val = ctx.splits.train, ctx.splits.val
    if ctx.profile.threat_model.poison_stage != "before_split" or len(val) == 0:
        return attack.poison(train, generator=gen), None
    pool = Dataset(torch.cat([train.x, val.x]), torch.cat([train.y, val.y]), train.num_classes, train.name,
                   train.class_names)
    p = attack.poison(pool, generator=gen)
    n = len(train)
    p_train, p_val = p.subset(torch.arange(n)), p.subset(torch.arange(n, len(pool)))
    notes.append(f"poisoned before the split (threat_model.poison_stage: before_split): {p_train.n_poison} poisons "
                 f"in the training split, {p_val.n_poison} in the validation split; the test split "
                 f"({len(ctx.splits.test)} images, dataset.holdout_fraction) was carved before poisoning")
    return p_train, p_val


def _fit_on_surrogate(ctx: RunContext, attack: Any, notes: list[str]) -> None:
    """Attacks that optimise against a model fit on a surrogate (and on victim test instances when they aim at
    some)."""
    train, test = ctx.splits.train, ctx.splits.test
    surrogate, note = _surrogate(ctx, train)
    notes.append(note)
    fit_kwargs: dict[str, Any] = {}
    if getattr(attack, "needs_victims", False):
        vidx = torch.nonzero(attack.victim_mask(test.y)).flatten()[: attack.n_victims]
        fit_kwargs["victims"] = test.x[vidx]
        fit_kwargs["victim_labels"] = test.y[vidx]
        notes.append(f"{len(vidx)} victim instances: the first test images of the source class(es); they stay "
                     "in the clean-accuracy test set")
    attack.fit(train, surrogate=surrogate, **fit_kwargs)


def _success_metrics(ctx: RunContext, model: torch.nn.Module, info: dict, x_aim: torch.Tensor, y_aim: torch.Tensor,
                     aim: torch.Tensor, metrics: dict, per_class: dict, notes: list[str]) -> None:
    """How often the aimed-at inputs land on their aimed label (``aim``), poisoned model vs baseline."""
    dev = ctx.device
    pred_t = predict(model, x_aim.to(dev)).cpu()
    hit_b = int((predict(ctx.baseline, x_aim.to(dev)).cpu() == aim).sum())
    name = "targeted_success_rate" if "flip_map" in info else "attack_success_rate"
    metrics[name] = proportion(int((pred_t == aim).sum()), len(x_aim))
    metrics["baseline"][name] = proportion(hit_b, len(x_aim))
    per_class["predicted_as_aimed_label_poisoned"] = [
        float((pred_t[y_aim == c] == aim[y_aim == c]).float().mean()) if bool((y_aim == c).any()) else None
        for c in range(ctx.splits.test.num_classes)]
    if info.get("mapping") == "all_to_all":
        notes.append(f"attack_success_rate: triggered test images (all {len(x_aim)}; all-to-all backdoor, no single "
                     "target) predicted as their mapped label (true label + 1 mod number of classes)")
        return
    target = int(aim[0])
    tname = _class_label(ctx.splits.test, target)
    if "flip_map" in info:
        notes.append(f"targeted_success_rate: test images of the flipped source classes predicted as {tname}, "
                     "the class their training labels were flipped to (the attack's target_class)")
    elif info.get("victims") is not None:
        notes.append(f"attack_success_rate: victim test instances predicted as {tname} (the attack's target)")
    else:
        notes.append(f"attack_success_rate: triggered test images of classes other than {tname} "
                     f"predicted as {tname} (the attack's target)")


def _surrogate(ctx: RunContext, train: Dataset) -> tuple[torch.nn.Module, str]:
    if ctx.profile.threat_model.model_access == "white-box":
        return ctx.baseline, "surrogate: the clean baseline (white-box attacker; trained on the clean training set)"
    seed = int(ctx.seed) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctx.build_fresh().to(ctx.device)
    train_model(model, train, recipe=ctx.recipe, seed=seed, val=None, device=ctx.device,
                description="attacker surrogate")
    return model.eval(), (f"surrogate: the baseline architecture trained by the attacker on the clean training set "
                          f"with seed {seed} (no access to the victim's weights)")


def _per_class(pred: torch.Tensor, y: torch.Tensor, k: int) -> list[float]:
    out = []
    for c in range(k):
        m = y == c
        out.append(float((pred[m] == c).float().mean()) if bool(m.any()) else None)
    return out


def _aimed_inputs(attack: Any, info: dict, test: Dataset, target: int | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The test inputs the attack tries to steer, their true labels and the label each is aimed at (see the module
    docstring); an all-to-all backdoor aims every triggered test image at its mapped label."""
    if info.get("mapping") == "all_to_all" and hasattr(attack, "backdoor_labels"):
        return attack.apply_trigger(test.x).cpu(), test.y, attack.backdoor_labels(test.y, test.num_classes)
    if target is None:
        return None, None, None
    if info.get("victims") is not None:
        x, y = info["victims"].cpu(), info["victim_labels"].cpu()
    elif "flip_map" in info:
        sources = [int(s) for s, t in info["flip_map"].items() if int(t) == target]
        keep = torch.isin(test.y, torch.tensor(sources, dtype=torch.long))
        x, y = test.x[keep], test.y[keep]
    elif hasattr(attack, "apply_trigger"):
        keep = test.y != target
        x, y = attack.apply_trigger(test.x[keep]).cpu(), test.y[keep]
    else:
        return None, None, None
    return x, y, torch.full_like(y, int(target))


def _class_label(data, c: int) -> str:
    """'class 3 ("cat")' when the data set has class names, else 'class 3'."""
    names = data.class_names or []
    return f'class {c} ("{names[c]}")' if 0 <= c < len(names) and names[c] != str(c) else f"class {c}"


def _poison_metrics(p: PoisonedDataset, target: int | None) -> dict[str, Any]:
    n = len(p)
    out: dict[str, Any] = {"count": scalar(p.n_poison, n=n), "fraction": scalar(p.poison_fraction, n=n),
                           "labels_changed": scalar(int(p.label_changed.sum()), n=n)}
    if target is not None:
        # Share of the samples the model is *trained* to call the target class that are poison: the clean-label
        # budget ("at most 50% of the target class") and, for dirty-label attacks, how much of it the poison is.
        labelled_target = p.y == target
        out["fraction_of_target_class"] = scalar(
            int((p.is_poison & labelled_target).sum()) / max(1, int(labelled_target.sum())),
            n=int(labelled_target.sum()))
    return out


def _visibility_metrics(p: PoisonedDataset) -> dict[str, Any]:
    changed = p.is_poison & (p.x != p.original_x).flatten(1).any(1)
    out: dict[str, Any] = {"images_changed": scalar(int(changed.sum()), n=len(p))}
    if bool(changed.any()):
        v = visibility(p.original_x[changed], p.x[changed])
        out.update({"linf_max": scalar(float(v["linf"].max()), n=int(changed.sum())),
                    "linf_mean": mean_metric(v["linf"].numpy()), "l2_mean": mean_metric(v["l2"].numpy()),
                    "ssim_mean": mean_metric(v["ssim"].numpy())})
    return out


def _save_artifacts(ctx: RunContext, spec: AttackSpec, attack: Any, p: PoisonedDataset, model: torch.nn.Module,
                    x_aim: torch.Tensor | None, aim: torch.Tensor | None) -> dict[str, str]:
    if not ctx.profile.output.figures:
        return {}
    out: dict[str, str] = {}
    folder = ctx.artifact_dir("attacks", spec.key)
    n_ex = max(1, ctx.profile.evaluation.n_examples)
    all_idx = torch.nonzero(p.is_poison).flatten()
    # evenly spaced over the poisoned samples, so the examples span classes (data sets are often sorted by label)
    idx = all_idx[torch.linspace(0, len(all_idx) - 1, min(n_ex, len(all_idx))).long().unique()] if len(all_idx) \
        else all_idx
    cmap = "gray" if p.shape[0] == 1 else None
    names = p.class_names or []
    cn = lambda c: names[c] if 0 <= c < len(names) else str(c)  # noqa: E731 - class names in every figure
    if len(idx):
        path = folder / "poison_examples.png"
        poison_examples_figure(path, p.original_x[idx], p.x[idx], p.original_y[idx], p.y[idx], cmap=cmap,
                               class_name=cn, title=f"{spec.key}: original vs poisoned training samples")
        out["original vs poisoned"] = ctx.rel(path)
    if callable(getattr(attack, "trigger_pattern", None)):
        try:
            pattern, mask = attack.trigger_pattern(p.shape)
        except (NotImplementedError, RuntimeError, ValueError):
            pattern = mask = None
        if pattern is not None:
            path = folder / "trigger.png"
            trigger_figure(path, pattern, mask, cmap=cmap)
            out["trigger and mask"] = ctx.rel(path)
    if x_aim is not None and len(x_aim) and aim is not None:
        xs = x_aim[:n_ex]
        pred = predict(model, xs.to(ctx.device)).cpu()
        path = folder / "attacked_test_inputs.png"
        attacked_inputs_figure(path, xs, pred, aim, cmap=cmap, class_name=cn)
        out["attacked test inputs"] = ctx.rel(path)
    return out
