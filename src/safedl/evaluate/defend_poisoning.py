"""Stage handlers for defenses against poisoning and backdoor attacks, scored against the attack's ground truth.

The attack stage's ``outcome.state`` holds the PoisonedDataset (with ``is_poison``), the poisoned model's
state_dict, the attack object, the target class and triggered test images. Every defense is measured on the same
test sets: clean accuracy on the whole test split and, where the attack aims at test inputs, the attack success rate
(aimed inputs predicted as the label they are aimed at: the target class, or for an all-to-all backdoor each image's
label + 1; ``aimed_labels``).

One function per defense kind, each relying only on its kind's protocol (``safedl.defenses.protocols``):

- cleanser: tpr, fpr, precision, recall, f1 against ``is_poison``, AUROC of the scores; then the baseline
  architecture is retrained with the baseline recipe and seed on the kept samples. The cleanser gets only the
  inputs it declares (``inputs``); a provenance cleanser is measured in two labelled scenarios (see
  :func:`_provenance_scenarios`).
- trainer: the baseline architecture trained on the poisoned data with the defense's training; ``facts()``.
- repair: the poisoned model repaired with the trusted clean set; ``report_`` and ``diagnostic_images()``.
- detector: fitted on the trusted clean set with the poisoned model; tpr on triggered test images, fpr on clean ones.
- inspector: the poisoned model compared with the clean baseline (same recipe) on the trusted set; its verdict is
  scored against the attack's ground truth (the model is poisoned; which class the attack aimed at).

The trusted clean set is the profile's ``trusted_clean_set`` (default: the validation split; see
:func:`trusted_set`).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn

from safedl.evaluate.context import RunContext
from safedl.evaluate.canary import canary_change_metric
from safedl.evaluate.base import AttackOutcome, defense_evaluator
from safedl.evaluate.cleanse_safeguard import per_class_accuracy, whole_mode_classes, whole_mode_note
from safedl.data.dataset import Dataset, PoisonedDataset
from safedl.defenses.protocols import (CleanserProtocol, InspectorProtocol, RepairProtocol, TrainerProtocol,
                                       poison_setting)
from safedl.errors import ProfileError
from safedl.report.stage_figures import image_grid, score_histograms, weight_histograms
from safedl.evaluate.defense_records import clean_confusion, removed_examples
from safedl.utils.stats import auroc, proportion, scalar
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)


def trusted_set(ctx: RunContext) -> tuple[Dataset | None, str]:
    """The trusted clean set the profile names, and a note saying what it is.

    ``validation`` (default): the validation split (clean in the simulation, because only the training split is
    poisoned; a real user's validation split may not be); ``path``: a file of images the user vouches for;
    ``none``: no trusted data. ``size`` keeps the first ``size`` images (e.g. 100).
    """
    spec = ctx.profile.trusted_clean_set
    if spec.source == "none":
        return None, "no trusted clean set (trusted_clean_set.source: none)"
    if spec.source == "path":
        from safedl.data.loaders import load_npz

        data, what = load_npz(spec.path), f"the trusted file {spec.path}"
    else:
        data, what = ctx.splits.val, "the validation split"
    if spec.size is not None and spec.size < len(data):
        data = data.subset(torch.arange(spec.size))
    note = f"trusted clean set: {what} ({len(data)} images)"
    if spec.source == "validation":
        note += ("; assumed clean: it is in this simulation, but if the data were poisoned before splitting it is "
                 "not, and the feature-space cleansers then found no poison (mnist5k, 10% checkerboard to class 3, "
                 "seed 0: TPR 0.000, n=353, with the validation split, 100 of its images or none; STRIP and "
                 "fine-pruning calibrated on it left ASR 1.000; digits: TPR 0.000, n=130; "
                 "bench/measure_poison_generalization.py --poison-before-split)")
    return data, note


def _required_trusted(ctx: RunContext, spec) -> tuple[Dataset, str]:
    """The trusted set for a defense that cannot work without one (profile validation refuses the combination;
    this guards programmatic use)."""
    trusted, note = trusted_set(ctx)
    if trusted is None or len(trusted) == 0:
        raise ProfileError(f"defense {spec.key!r} needs a trusted clean set but trusted_clean_set.source is 'none'")
    return trusted, note


def _poisoned_model(ctx: RunContext, state: dict) -> nn.Module:
    m = ctx.build_model()
    m.load_state_dict(state["model_state"])
    return m.eval()


def aimed_labels(state: dict) -> torch.Tensor | None:
    """The label each aimed test input (``test_triggered_x``) is sent to: the attack stage's ``test_triggered_aim``
    (all-to-all: label + 1), else the target class for every input; None when the attack aims at nothing."""
    xt = state.get("test_triggered_x")
    if xt is None:
        return None
    if state.get("test_triggered_aim") is not None:
        return state["test_triggered_aim"].cpu()
    target = state.get("target_class")
    return None if target is None else torch.full((len(xt),), int(target), dtype=torch.long)


def _outcome_metrics(ctx: RunContext, model: nn.Module, state: dict) -> dict[str, Any]:
    test = ctx.splits.test
    pred = predict(model, test.x.to(ctx.device)).cpu()
    out = {"clean_accuracy_after": proportion(int((pred == test.y).sum()), len(test))}
    xt, aim = state.get("test_triggered_x"), aimed_labels(state)
    if aim is not None and len(xt):
        pt = predict(model, xt.to(ctx.device)).cpu()
        out["attack_success_rate_after"] = proportion(int((pt == aim).sum()), len(xt))
    canary = canary_change_metric(ctx.profile.canary_records, ctx.splits, ctx.baseline, model, device=ctx.device)
    if canary is not None:  # the defended model's canary records against the clean baseline's (gate: max_canary_changes)
        out["canary_changes"] = canary
    return out


def _auroc(score: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.bool()
    return auroc(score[~truth].double(), score[truth].double())


def detection_metrics(flag: torch.Tensor, score: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """tpr, fpr, precision, recall, f1 of ``flag`` against ``truth``, AUROC of ``score``."""
    flag, truth = flag.bool().cpu(), truth.bool().cpu()
    tp, fp = int((flag & truth).sum()), int((flag & ~truth).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / pos if pos else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    return {"tpr": proportion(tp, pos), "fpr": proportion(fp, neg), "precision": proportion(tp, tp + fp),
            "recall": proportion(tp, pos), "f1": scalar(f1, n=len(flag)),
            "auroc": scalar(_auroc(score.cpu(), truth), n=len(flag))}


# ------------------------------------------------------------------------------------------------ cleanser

def _train_fn(ctx: RunContext, what: str):
    def fn(data: Dataset, **kw: Any) -> nn.Module:
        return ctx.train_like_baseline(data, description=f"{what}: training", **kw)

    return fn


def contributors(poisoned: PoisonedDataset, *, n_sources: int, attacker: int, seed: int,
                 spread: str = "attacker") -> torch.Tensor:
    """Each sample's contributor: clean samples spread uniformly over ``n_sources`` named contributors; every poison
    from ``attacker`` (``spread="attacker"``: the contributor the attacker controls) or, like the clean samples,
    from any contributor (``"uniform"``)."""
    if not 0 <= attacker < n_sources:
        raise ProfileError(f"data_provenance.attacker={attacker} is not a contributor: allowed 0...{n_sources - 1}")
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_sources, (len(poisoned),), generator=g)
    if spread == "attacker":
        src[poisoned.is_poison.cpu()] = attacker
    return src


def _cleanser_inputs(ctx: RunContext, comp: CleanserProtocol, model: nn.Module,
                     trusted: Dataset | None) -> dict[str, Any]:
    """Exactly the inputs the cleanser declares."""
    have = {"model": model, "trusted": trusted, "train_fn": _train_fn(ctx, comp.registry_name)}  # type: ignore[attr-defined]
    return {k: v for k, v in have.items() if k in comp.inputs}


def _provenance_scenarios(ctx: RunContext, comp: Any, poisoned: PoisonedDataset, kwargs: dict, notes: list[str]):
    """Provenance as it is used: data arrive from named contributors and are signed at ingestion.

    (1) ``contributed poison`` (the headline): the profile's ``data_provenance`` names the contributors and how the
    poison spreads over them (default: 5, contributor 0 supplies every poison); the manifest signed at ingestion
    covers the poison too, so only the per-source test (retrain without each contributor, compare on the trusted
    set) can find it, from accuracy alone. (2) ``tamper after ingestion``: the manifest was signed over
    the data before the attack, which then altered samples in storage; the hash check finds exactly those (by
    construction: this measures the integrity check, not a poison detector).
    """
    from safedl.defenses.cleanse.provenance_tracking import build_manifest

    prov = ctx.profile.data_provenance
    sources = contributors(poisoned, n_sources=prov.contributors, attacker=prov.attacker, seed=ctx.seed,
                           spread=prov.poison_spread)
    key = os.urandom(32)
    received = build_manifest(poisoned.clean_view(), sources, key=key)
    res = comp.find_poison(poisoned, **kwargs, manifest=received, key=key)
    original = Dataset(poisoned.original_x, poisoned.original_y, poisoned.num_classes)
    tamper = comp.check_manifest(poisoned, manifest=build_manifest(original, sources, key=key), key=key)
    who = (f"contributor {prov.attacker} supplies every poison" if prov.poison_spread == "attacker"
           else "poison spread evenly over all of them")
    notes.append(f"provenance (headline): {prov.contributors} named contributors (data_provenance), {who}, manifest "
                 f"signed (HMAC-SHA256) at ingestion; flagged contributors: {res.info.get('flagged_sources')}")
    notes.append("detection_tamper_after_ingestion: manifest signed before the attack, samples altered in storage "
                 "afterwards; the hash check finds altered samples by construction (an integrity check)")
    flagged = res.info.get("flagged_sources") or []
    extra = {"detection_tamper_after_ingestion": detection_metrics(tamper.is_suspect, tamper.score,
                                                                   poisoned.is_poison.cpu()),
             "contributors_flagged": scalar(len(flagged), n=prov.contributors)}
    if prov.poison_spread == "attacker":
        extra["attacker_source_flagged"] = scalar(float(prov.attacker in flagged))
        extra["clean_contributors_flagged"] = scalar(len(set(flagged) - {prov.attacker}), n=prov.contributors - 1)
    return res, extra


def known_weak_warnings(comp: CleanserProtocol, info: dict, *, trusted: bool,
                        trusted_per_class: float | None = None) -> list[str]:
    """Warnings for the settings of this run in which the cleanser is measured to fail (its ``known_weak``)."""
    keys = poison_setting(info, trusted=trusted, trusted_per_class=trusted_per_class) | {"any"}
    return [f"warning: {comp.registry_name} is known to fail here ({k}): {comp.known_weak[k]}"  # type: ignore[attr-defined]
            for k in sorted(keys & set(comp.known_weak))]


def _cleanser_figures(ctx: RunContext, spec, outcome: AttackOutcome, res, poisoned: PoisonedDataset) -> dict:
    if not ctx.profile.output.figures:
        return {}
    d, stem, truth = ctx.artifact_dir("defenses"), _stem(ctx, spec, outcome), poisoned.is_poison.cpu()
    artifacts: dict[str, str] = {}
    flagged = torch.nonzero(res.is_suspect).flatten()
    if len(flagged):
        show = flagged[torch.argsort(res.score[flagged], descending=True)][:32]
        titles = [f"y={int(poisoned.y[i])} {'P' if truth[i] else 'clean'}" for i in show]
        p = d / f"{stem}_flagged.png"
        image_grid(p, poisoned.x[show].cpu(), titles, f"{spec.key}: highest-scoring flagged samples (P = true poison)")
        artifacts["flagged samples (highest scores)"] = ctx.rel(p)
    p = d / f"{stem}_scores.png"
    score_histograms(p, res.score, poisoned.y.cpu(), truth, poisoned.num_classes)
    artifacts["outlier scores per class"] = ctx.rel(p)
    return artifacts


@defense_evaluator("cleanser", "poisoning", "backdoor")
def evaluate_cleanser(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    """A cleanser against a poisoning or backdoor attack: its flags scored against the attack's ground truth, then
    the model retrained on the kept data with the baseline recipe."""
    t_start = time.perf_counter()
    state, comp = outcome.state, components[0]
    poisoned: PoisonedDataset = state["poisoned"]
    trusted, trusted_note = trusted_set(ctx)
    kwargs = _cleanser_inputs(ctx, comp, _poisoned_model(ctx, state), trusted)
    notes: list[str] = []
    if "trusted" in comp.inputs:
        notes.append(f"{trusted_note} ({comp.trusted_role})")
    per_class = len(trusted) / trusted.num_classes if trusted is not None and "trusted" in comp.inputs else None
    notes.extend(known_weak_warnings(comp, poisoned.info, trusted=trusted is not None or "trusted" not in comp.inputs,
                                     trusted_per_class=per_class))
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if "provenance" in comp.inputs:
        res, extra = _provenance_scenarios(ctx, comp, poisoned, kwargs, notes)
    else:
        res = comp.find_poison(poisoned, **kwargs)
    t_detect = time.perf_counter() - t0
    truth = poisoned.is_poison.cpu()
    metrics: dict[str, Any] = {"detection": detection_metrics(res.is_suspect, res.score, truth),
                               "flagged": scalar(res.n_flagged, n=len(truth)), "detect_time_s": scalar(t_detect),
                               **extra}
    retrained = ctx.train_like_baseline(poisoned.subset(res.keep), description=f"{spec.key}: retraining on kept data")
    metrics.update(_outcome_metrics(ctx, retrained, state))
    whole = whole_mode_classes(flagged=res.is_suspect, labels=poisoned.y.cpu(), acc_before=per_class_accuracy(
        _poisoned_model(ctx, state), ctx.splits.test, device=ctx.device), acc_after=per_class_accuracy(
        retrained, ctx.splits.test, device=ctx.device))
    metrics["whole_mode_classes"] = scalar(len(whole), n=poisoned.num_classes)
    if whole:
        notes.append(whole_mode_note(spec.key, whole))
    metrics["poison_remaining"] = proportion(int((truth & res.keep).sum()), int(res.keep.sum()))
    per_class = {"flagged": [int((res.is_suspect & (poisoned.y == c)).sum()) for c in range(poisoned.num_classes)],
                 "true_poison": [int((truth & (poisoned.y == c)).sum()) for c in range(poisoned.num_classes)]}
    info = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    info["whole_mode"] = whole
    if "poisoned_classes" in info:
        notes.append(f"classes judged poisoned: {info['poisoned_classes']}")
    return {"name": spec.name, "metrics": metrics, "per_class": per_class, "notes": notes,
            "artifacts": _cleanser_figures(ctx, spec, outcome, res, poisoned), "info": _jsonable(info),
            "confusion": clean_confusion(ctx, retrained),
            "removed_indices": torch.nonzero(res.is_suspect).flatten().tolist(),  # into the poisoned training set
            "examples": removed_examples(ctx, _stem(ctx, spec, outcome), res, poisoned), "time_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ trainer

@defense_evaluator("trainer", "poisoning", "backdoor")
def evaluate_trainer(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    """A robust trainer on the poisoned training set: clean accuracy and attack success rate of what it trains."""
    t_start = time.perf_counter()
    state = outcome.state
    comp: TrainerProtocol = components[0]
    m = comp.fit(ctx.build_model(), state["poisoned"], recipe=ctx.recipe, seed=ctx.seed, device=ctx.device,
                 val=ctx.splits.val)
    metrics = _outcome_metrics(ctx, m, state)
    notes = [f"trained on the poisoned data with the baseline recipe ({ctx.recipe.epochs} epochs, seed {ctx.seed})"]
    facts = comp.facts()
    metrics.update({k: scalar(float(v)) for k, v in facts.items()})
    if facts:
        notes.append(f"{comp.registry_name}: " + ", ".join(f"{k} {float(v):.3g}" for k, v in facts.items()))  # type: ignore[attr-defined]
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": {},
            "confusion": clean_confusion(ctx, m), "time_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ repair

def _repair_notes(report: dict, target: int | None, metrics: dict) -> list[str]:
    notes = []
    if "infected_classes" in report:
        notes.append(f"classes flagged as infected: {report['infected_classes']} (attack target: {target})")
        if target is not None:
            metrics["target_class_flagged"] = scalar(float(target in report["infected_classes"]))
            if "anomaly_index" in report:
                notes.append(f"anomaly index of class {target} ({report.get('anomaly_space', 'l1')}): "
                             f"{report['anomaly_index'][target]:.2f} (threshold {report.get('anomaly_threshold')})")
            if "anomaly_index_other_space" in report:  # the paper's rule next to ours, or ours next to the paper's
                other = [c for c, v in enumerate(report["anomaly_index_other_space"])
                         if v > report.get("anomaly_threshold", 2.0)]
                notes.append(f"with the other anomaly space, classes flagged would be: {other}")
    if "pruned" in report:
        notes.append(f"pruned {report['pruned']} of {report.get('channels', report.get('units'))} units")
    return notes


@defense_evaluator("repair", "poisoning", "backdoor")
def evaluate_repair(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    """A repair of the poisoned model: clean accuracy and attack success rate before and after it."""
    t_start = time.perf_counter()
    state = outcome.state
    comp: RepairProtocol = components[0]
    trusted, trusted_note = _required_trusted(ctx, spec)
    model = _poisoned_model(ctx, state)
    before = _outcome_metrics(ctx, model, state)
    repaired = comp.repair(model, clean=trusted, device=ctx.device, seed=ctx.seed)
    metrics = _outcome_metrics(ctx, repaired, state)
    metrics["clean_accuracy_before"] = before["clean_accuracy_after"]
    if "attack_success_rate_after" in before:
        metrics["attack_success_rate_before"] = before["attack_success_rate_after"]
    notes = [trusted_note + " (repair data)", *_repair_notes(comp.report_, state.get("target_class"), metrics)]
    artifacts: dict[str, str] = {}
    if ctx.profile.output.figures:
        for i, (title, (x, titles)) in enumerate(comp.diagnostic_images().items()):
            p = ctx.artifact_dir("defenses") / f"{_stem(ctx, spec, outcome)}_diagnostic{i}.png"
            image_grid(p, x, titles, title)
            artifacts[title] = ctx.rel(p)
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": artifacts,
            "info": _jsonable(comp.report_), "confusion": clean_confusion(ctx, repaired),
            "time_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ detector

def _triggered_detection(model, det, s_clean: torch.Tensor, xt: torch.Tensor, aim: torch.Tensor | None,
                         ctx) -> dict[str, Any]:
    s_trig = det.score(xt.to(ctx.device)).cpu()
    tp = int((s_trig > det.threshold_).sum())
    truth = torch.cat([torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_trig), dtype=torch.bool)])
    out: dict[str, Any] = {"tpr": proportion(tp, len(xt)),
                           "auroc": scalar(_auroc(torch.cat([s_clean, s_trig]), truth), n=len(truth))}
    asr = None
    if aim is not None:  # what passes the detector: attack success among unflagged triggered inputs
        passed = s_trig <= det.threshold_
        pt = predict(model, xt[passed].to(ctx.device)).cpu() if bool(passed.any()) else torch.empty(0, dtype=torch.long)
        asr = proportion(int((pt == aim[passed]).sum()), len(xt))
    return {"detection": out, "asr": asr}


@defense_evaluator("detector", "poisoning", "backdoor")
def evaluate_detector(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    """A test-time detector against a poisoning or backdoor attack, on the poisoned model: the attacked test inputs
    it flags, the clean ones it flags, and the attack success rate on what it lets through."""
    t_start = time.perf_counter()
    state, det = outcome.state, components[0]
    model = _poisoned_model(ctx, state)
    trusted, trusted_note = _required_trusted(ctx, spec)
    det.fit(trusted.x.to(ctx.device), model=model, seed=ctx.seed)
    clean = ctx.splits.test.x
    s_clean = det.score(clean.to(ctx.device)).cpu()
    metrics: dict[str, Any] = {"detection": {"fpr": proportion(int((s_clean > det.threshold_).sum()), len(clean))}}
    notes = [trusted_note + " (overlays and threshold calibration)", "fpr on the clean test split"]
    xt = state.get("test_triggered_x")
    if xt is not None and len(xt):
        r = _triggered_detection(model, det, s_clean, xt, aimed_labels(state), ctx)
        metrics["detection"].update(r["detection"])
        if r["asr"] is not None:
            metrics["attack_success_rate_after"] = r["asr"]
        notes.append("tpr on the triggered test images the attack aims at (all-to-one: those of non-target "
                     "classes; all-to-all: every test image)")
    correct = predict(model, clean.to(ctx.device)).cpu() == ctx.splits.test.y
    metrics["clean_accuracy_after"] = proportion(int((correct & (s_clean <= det.threshold_)).sum()), len(clean))
    notes.append("clean_accuracy_after counts a rejected clean input as an error")
    return {"name": spec.name, "metrics": metrics, "notes": notes, "artifacts": {},
            "time_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ inspector

@defense_evaluator("inspector", "poisoning", "backdoor")
def evaluate_inspector(ctx: RunContext, spec, components: list[Any], outcome: AttackOutcome) -> dict:
    """The poisoned model against the clean baseline (same recipe), on the trusted set; the verdict is scored:
    the model is poisoned, so ``suspicious`` should be True, and the attack's target class should be named."""
    t_start = time.perf_counter()
    state = outcome.state
    comp: InspectorProtocol = components[0]
    trusted, trusted_note = _required_trusted(ctx, spec)
    report = comp.inspect(_poisoned_model(ctx, state), reference=ctx.baseline, data=trusted, device=ctx.device)
    target = state.get("target_class")
    metrics: dict[str, Any] = {"model_flagged": scalar(float(bool(report["suspicious"])))}
    notes = ["diagnostics of the poisoned model against the clean baseline; nothing is changed", trusted_note,
             f"verdict: {'suspicious' if report['suspicious'] else 'not suspicious'} (ground truth: poisoned); "
             f"classes named: {report['flagged_classes'] or 'none'} (attack target: {target})"]
    if target is not None:
        metrics["target_class_flagged"] = scalar(float(target in report["flagged_classes"]))
    per_class = {k: v for k, v in report.items() if k.startswith("per_class_")}
    artifacts: dict[str, str] = {}
    if ctx.profile.output.figures and report.get("histograms"):
        p = ctx.artifact_dir("defenses") / f"{_stem(ctx, spec, outcome)}_weights.png"
        weight_histograms(p, report["histograms"])
        artifacts["weight histograms per layer"] = ctx.rel(p)
    return {"name": spec.name, "metrics": metrics, "per_class": per_class, "notes": notes, "artifacts": artifacts,
            "info": _jsonable({k: v for k, v in report.items() if k != "histograms"}),
            "time_s": time.perf_counter() - t_start}



def _stem(ctx: RunContext, spec, outcome: AttackOutcome) -> str:
    return f"{spec.key}_vs_{outcome.entry.get('id', outcome.entry.get('name', 'attack'))}"


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
