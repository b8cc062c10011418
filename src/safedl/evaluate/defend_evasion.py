"""Evaluate evasion defenses (preprocessors, detectors, robust trainers, certifiers, postprocessors, and layered
pipelines of them) against one evasion attack outcome, adaptively.

The defended system is a :class:`~safedl.deploy.SecurePipeline` (preprocessors -> detectors -> the model, robustly
trained when a trainer is listed, noise-trained under randomized smoothing -> postprocessors); the stage measures
exactly that object and saves it as a bundle in the run directory, so ``safedl export`` deploys what was measured.
An input counts as defended when it is rejected or classified correctly. Two robust accuracies are reported:

- ``robust_accuracy_nonadaptive``: the attack outcome's examples (crafted on the undefended baseline) sent through
  the defended system;
- ``robust_accuracy`` (adaptive): the same attack re-run on the defended system, with gradients through
  differentiable preprocessors, BPDA through the others, EOT over randomized ones, straight-through
  postprocessors, and, when detectors are present, additionally a detector-aware PGD (fool the classifier and keep
  every detector under its threshold); a sample counts as defended only if it survives every adaptive attack.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from safedl import registry
from safedl.evaluate.context import RunContext
from safedl.evaluate.defense_models import train_defense_model
from safedl.evaluate.base import AttackOutcome, EvasionState, defense_evaluator
from safedl.evaluate.defense_confusion import evasion_confusions, worst_case_decision
from safedl.evaluate.verified import interval_certification
from safedl.defenses.adaptive import DetectorAwarePGD, defended_model, strong_adaptive_suite
from safedl.defenses.preprocess._base import Preprocessor
from safedl.defenses.preprocess.gaussian_augmentation import GaussianAugmentation
from safedl.deploy.pipeline import Decision, SecurePipeline
from safedl.deploy.run_export import save_system
from safedl.profile import DefenseSpec
from safedl.report.stage_figures import bar_figure
from safedl.utils.stats import auroc, proportion, scalar
from safedl.utils.tensors import predict

log = logging.getLogger(__name__)
RADII = (0.0, 0.25, 0.5, 1.0, 1.5)
N_DETECTOR_FIT = 2000
KINDS = ("preprocessor", "detector", "trainer", "certifier", "postprocessor")


def _split(components: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in KINDS}
    for c in components:
        out[c.registry_kind].append(c)
    return out


def _run_batched(fn: Callable, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, bs: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs], y[i:i + bs], None if target is None else target[i:i + bs])
                      for i in range(0, len(x), bs)])


# ---------------------------------------------------------------------------------------------- the system

def _defense_model(ctx: RunContext, parts: dict[str, list[Any]], metrics: dict, notes: list[str]) -> nn.Module:
    """The model behind the defense: the baseline, a robustly trained model, or smoothing's base classifier."""
    if parts["certifier"]:
        cert = parts["certifier"][0]
        trained = train_defense_model(ctx, cert)
        again = " (reloaded)" if trained.reloaded else ""
        if cert.randomized:
            notes.append(f"randomized smoothing: base model trained with Gaussian noise sigma={cert.sigma} (baseline "
                         f"recipe and seed){again}; abstentions count as rejections")
        else:
            notes.append(f"{cert.registry_name} certifier: a fresh model trained by interval bound propagation at "
                         f"L-inf eps {cert.train_eps_factor:g} x {cert.eps:g} (baseline recipe and seed){again}")
    elif parts["trainer"]:
        trainer = parts["trainer"][0]
        trained = train_defense_model(ctx, trainer, architecture=trainer.architecture, facts=trainer.facts)
        epochs = registry.creation_params(trainer).get("epochs")
        notes.append(f"{trainer.registry_name}: a fresh model trained with the baseline recipe and seed"
                     + (f", except epochs={epochs} (the trainer's override)" if epochs is not None else "")
                     + (" (reloaded from the stage folder)" if trained.reloaded else ""))
        for name, value in trained.facts.items():
            metrics[name] = scalar(float(value))
        if "epsilon_spent" in trained.facts:
            f = trained.facts
            notes.append(f"DP-SGD: epsilon spent {f['epsilon_spent']:.3g} (target {f['target_epsilon']:g}), "
                         f"delta {f['delta']:g}")
    else:
        return ctx.baseline
    if len(parts["trainer"]) > 1 or (parts["certifier"] and parts["trainer"]):
        notes.append("only one model-training component is used (the certifier, else the first trainer)")
    metrics["training_time_s"] = scalar(trained.time_s)
    return trained.model


def _fit_detectors(ctx: RunContext, detectors: list[Any], pre: list[nn.Module], model: nn.Module,
                   notes: list[str]) -> None:
    """Fit each detector on preprocessed clean training images (raw ones for a detector that ``sees_raw_input``);
    calibrate its threshold on half of the validation split (the other half sets the 1%/5% thresholds of the
    detection metrics)."""
    if not detectors:
        return
    dev = ctx.device
    x_raw, cal_raw = ctx.splits.train.x[:N_DETECTOR_FIT].to(dev), ctx.splits.val.x.to(dev)[::2]
    with torch.no_grad():
        squeeze = nn.Sequential(*pre)
        xf, x_cal = squeeze(x_raw), squeeze(cal_raw)
    for d in detectors:
        fit_x, fit_cal = (x_raw, cal_raw) if d.sees_raw_input else (xf, x_cal)
        d.fit(fit_x, model=model, y=ctx.splits.train.y[:N_DETECTOR_FIT].to(dev), x_calibration=fit_cal, seed=ctx.seed)
        where = "raw (in front of the preprocessors)" if d.sees_raw_input and pre else "clean"
        notes.append(f"{d.registry_name}: fitted on {len(fit_x)} {where} training images, threshold calibrated "
                     f"for {d.fpr:.0%} clean FPR on {len(fit_cal)} clean validation images")


def _fit_preprocessors(ctx: RunContext, pre: list[nn.Module], notes: list[str]) -> None:
    """Fit each learned preprocessor (``needs_fit``) on clean training images passed through the ones before it."""
    learned = [i for i, p in enumerate(pre) if isinstance(p, Preprocessor) and p.needs_fit]
    if not learned:
        return
    x = ctx.splits.train.x[:N_DETECTOR_FIT].to(ctx.device)
    for p in pre[:learned[-1] + 1]:
        if isinstance(p, Preprocessor) and p.needs_fit:
            p.fit(x, seed=ctx.seed)
            notes.append(f"{p.registry_name}: fitted on {len(x)} clean training images")
        with torch.no_grad():
            x = p(x)


def build_system(ctx: RunContext, components: Sequence[Any], metrics: dict, notes: list[str]) -> SecurePipeline:
    """The defended system of one defense spec, with its model trained and its detectors fitted."""
    parts = _split(components)
    model = _defense_model(ctx, parts, metrics, notes)
    _fit_preprocessors(ctx, parts["preprocessor"], notes)
    _fit_detectors(ctx, parts["detector"], parts["preprocessor"], model, notes)
    return SecurePipeline(model=model, preprocessors=parts["preprocessor"], detectors=parts["detector"],
                          postprocessors=parts["postprocessor"],
                          certifier=parts["certifier"][0] if parts["certifier"] else None,
                          class_names=ctx.splits.train.class_names, input_shape=ctx.splits.shape,
                          batch_size=ctx.profile.evaluation.batch_size)


# ---------------------------------------------------------------------------------------------- measurements

def _clean_metrics(ctx: RunContext, system: SecurePipeline, x: torch.Tensor, y: torch.Tensor, metrics: dict) -> Any:
    """Clean accuracy of the defended and undefended model; returns the defended system's clean decision."""
    t0 = time.perf_counter()
    dec = system.decide(x)
    t_def = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_pred = predict(ctx.baseline, x, batch_size=ctx.profile.evaluation.batch_size)
    t_base = time.perf_counter() - t0
    n = len(y)
    metrics["clean_accuracy"] = proportion(int(dec.accepted_correct(y).sum()), n)
    metrics["clean_accuracy_undefended"] = proportion(int((base_pred == y).sum()), n)
    if system.detectors or system.certifier is not None:
        metrics["clean_rejection_rate"] = proportion(int(dec.rejected.sum()), n)
    metrics["latency_added_ms_per_image"] = scalar(1000 * (t_def - t_base) / max(1, n), n=n)
    return dec


def _attack_target(ctx: RunContext, system: SecurePipeline, attack: Any, notes: list[str]) -> nn.Module:
    """The model the adaptive attack runs on: the attack surface of the defended system."""
    if system.certifier is not None and system.certifier.randomized:
        # EOT over the smoothing noise (unclipped, exactly the noise the certificate is about)
        noise = GaussianAugmentation(sigma=system.certifier.sigma, clip=False, seed=ctx.seed)
        notes.append("adaptive: attack on the smoothed classifier through EOT over 16 Gaussian draws per step")
        return defended_model([noise], system.model, [], adaptive=True, eot_samples=16)
    if attack.access != "white-box":
        notes.append(f"adaptive: the {attack.access} attack queries the deployed defended system")
        return system.deployed
    how = [f"{p.registry_name}: {'gradients' if p.differentiable else 'BPDA'}{' + EOT(8)' if p.randomized else ''}"
           for p in system.preprocessors]
    how += [f"{q.registry_name}: straight-through" for q in system.postprocessors]
    notes.append("adaptive white-box attack on the defended system" + (f" ({'; '.join(how)})" if how else ""))
    return system.attack_surface(eot_samples=8)


def _has_own_approximation(system: SecurePipeline) -> bool:
    return any(not p.differentiable and type(p).approximation is not Preprocessor.approximation
               for p in system.preprocessors)


def _rerun_attack(ctx: RunContext, system: SecurePipeline, st: EvasionState, notes: list[str]
                  ) -> tuple[list[Decision], torch.Tensor]:
    """Re-run the paired attack on the defended system; returns (the system's decisions on each set of adaptive
    examples, the paired attack's examples)."""
    bs = ctx.profile.evaluation.batch_size
    attack = registry.create("evasion", st.spec["name"], **st.spec.get("params", {}))
    target_model = _attack_target(ctx, system, attack, notes)
    if attack.access == "transfer":  # the attacker trains a surrogate against the deployed system
        attack.fit(ctx.splits.train, model=system.deployed, device=ctx.device)
    x_ad = _run_batched(lambda a, b, t: attack(target_model, a, b, target=t), st.x, st.y, st.target, bs)
    decisions = [system.decide(x_ad)]
    if attack.access == "white-box" and system.preprocessors and _has_own_approximation(system):
        # a smooth surrogate can have vanishing gradients: also try BPDA with the identity, keep the worst case
        ident = system.attack_surface(eot_samples=8, bpda="identity")
        x_id = _run_batched(lambda a, b, t: attack(ident, a, b, target=t), st.x, st.y, st.target, bs)
        decisions.append(system.decide(x_id))
        notes.append("adaptive: BPDA through each preprocessor's differentiable approximation and BPDA with the "
                     "identity, per-sample worst case")
    return decisions, x_ad


def _detector_aware(ctx: RunContext, system: SecurePipeline, st: EvasionState, notes: list[str]
                    ) -> tuple[Decision, torch.Tensor] | None:
    """Detector-aware PGD within the paired attack's budget (None when the attack has no eps budget)."""
    attack = registry.create("evasion", st.spec["name"], **st.spec.get("params", {}))
    name = st.spec["name"]
    if not (attack.bounded and attack.eps > 0) and attack.takes_penalty:
        return _penalized_attack(ctx, system, attack, st, notes)
    if not (attack.bounded and attack.eps > 0):
        notes.append(f"{name} has no eps budget, so no detector-aware PGD was run (only {name} on the defended "
                     "classifier): the adaptive number may overstate robustness")
        return None
    dpgd = DetectorAwarePGD(eps=attack.eps, norm=attack.norm, steps=max(40, int(getattr(attack, "steps", 40))),
                            seed=ctx.seed)
    clf = system.attack_surface()
    x_det = _run_batched(lambda a, b, t: dpgd(clf, system.detectors, a, b, target=t), st.x, st.y, st.target,
                         ctx.profile.evaluation.batch_size)
    notes.append(f"adaptive on detectors: detector-aware PGD ({dpgd.steps} steps, eps {dpgd.eps} {dpgd.norm}: "
                 "classification margin + hinge on every detector score above its threshold); a sample is "
                 f"defended only if it survives both this and {name} on the defended classifier")
    return system.decide(x_det), x_det


def detector_hinge(detectors: Sequence[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per sample, the sum over detectors of their score above threshold in units of the clean spread (0 when
    every detector is at or below its threshold); differentiable where the scores are."""
    def penalty(x: torch.Tensor) -> torch.Tensor:
        return sum(torch.relu((d.score_torch(x) - d.threshold_) / d.score_scale_) for d in detectors)
    return penalty


def _penalized_attack(ctx: RunContext, system: SecurePipeline, attack: Any, st: EvasionState, notes: list[str]
                      ) -> tuple[Decision, torch.Tensor]:
    """The paired L0 / patch attack (no eps ball) with the detectors' hinge in its objective (our detector-aware
    variant: the attacker knows the detectors and their thresholds)."""
    aware = attack.with_penalty(detector_hinge(system.detectors))
    target_model = _attack_target(ctx, system, aware, [])
    x_det = _run_batched(lambda a, b, t: aware(target_model, a, b, target=t), st.x, st.y, st.target,
                         ctx.profile.evaluation.batch_size)
    notes.append(f"adaptive on detectors: {attack.registry_name} with every detector's score above its threshold "
                 "added to its objective (a success must also go undetected); a sample is defended only if it "
                 f"survives both this and {attack.registry_name} on the defended classifier")
    return system.decide(x_det), x_det


def _strong_suite(ctx: RunContext, system: SecurePipeline, st: EvasionState, metrics: dict, notes: list[str]
                  ) -> Decision | None:
    """The strong adaptive suite within the paired attack's budget, on defenses that change the model or its
    inputs (None where it does not apply: no such defense, a certifier, an attack without an eps budget, or a
    threat model without white-box access)."""
    cfg = ctx.profile.evaluation.strong_adaptive
    attack = registry.create("evasion", st.spec["name"], **st.spec.get("params", {}))
    changes = bool(system.preprocessors) or system.model is not ctx.baseline
    randomized = system.certifier is not None and system.certifier.randomized
    if not (cfg.enabled and changes and not randomized and attack.bounded and attack.eps > 0):
        return None
    if ctx.profile.threat_model.model_access != "white-box":
        notes.append("strong adaptive suite not run: the threat model gives the attacker no white-box access")
        return None
    bs = ctx.profile.evaluation.batch_size
    results = [ctx.suite_batches[i] if i in ctx.suite_batches else
               strong_adaptive_suite(system.model, st.x[i:i + bs], st.y[i:i + bs], eps=attack.eps, norm=attack.norm,
                                     seed=ctx.seed, preprocessors=system.preprocessors,
                                     postprocessors=system.postprocessors, steps=cfg.steps, restarts=cfg.restarts,
                                     eot_samples=cfg.eot_samples) for i in range(0, len(st.x), bs)]
    decision = system.decide(torch.cat([r.x_adv for r in results]))
    defended = decision.defended(st.y)
    broken_by = torch.cat([r.broken_by for r in results])
    metrics["robust_accuracy_strong_suite"] = proportion(int(defended.sum()), len(st.y))
    budget = dict(results[0].budget)
    budget["members"] = results[0].members
    metrics["strong_suite_budget"] = budget
    metrics["strong_suite_broken_by"] = {m: int((broken_by == i).sum()) for i, m in enumerate(results[0].members)}
    notes.append(f"strong adaptive suite ({', '.join(results[0].members)}; {cfg.steps} steps x {cfg.restarts} "
                 f"restarts, eps {attack.eps:g} {attack.norm}, BPDA {'/'.join(budget['bpda'])}"
                 f"{', EOT ' + str(cfg.eot_samples) if any(p.randomized for p in system.preprocessors) else ''}): "
                 "its examples are judged by the deployed system and count in the worst case")
    return decision


def _robustness(ctx: RunContext, system: SecurePipeline, st: EvasionState, metrics: dict, notes: list[str],
                decisions: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-adaptive and adaptive robust accuracy; returns the examples the detection metrics score and the
    per-sample defended mask behind ``robust_accuracy``. ``decisions["adaptive"]`` becomes the per-sample worst
    case over the same attacks (so its confusion matrix counts exactly the samples ``robust_accuracy`` counts)."""
    n = len(st.y)
    decisions["non-adaptive"] = system.decide(st.x_adv)
    defended_na = decisions["non-adaptive"].defended(st.y)
    metrics["robust_accuracy_nonadaptive"] = proportion(int(defended_na.sum()), n)
    suite_decisions, x_eval = _rerun_attack(ctx, system, st, notes)
    if system.detectors:
        aware = _detector_aware(ctx, system, st, notes)
        if aware is not None:
            suite_decisions.append(aware[0])
            x_eval = aware[1]

    def defended_under(ds: list[Decision]) -> torch.Tensor:
        return torch.stack([d.defended(st.y) for d in ds]).all(0)

    metrics["robust_accuracy_paired_adaptive"] = proportion(int(defended_under(suite_decisions).sum()), n)
    suite = _strong_suite(ctx, system, st, metrics, notes)
    if suite is not None:
        suite_decisions.append(suite)
    metrics["robust_accuracy_adaptive_only"] = proportion(int(defended_under(suite_decisions).sum()), n)
    # the adaptive attacker may also submit the transferred examples: the reported number is the worst case
    suite_decisions.append(decisions["non-adaptive"])
    defended_ad = defended_under(suite_decisions)
    decisions["adaptive"] = worst_case_decision(suite_decisions, st.y)
    metrics["robust_accuracy"] = proportion(int(defended_ad.sum()), n)
    metrics["robust_accuracy_gap"] = scalar(float(defended_na.float().mean() - defended_ad.float().mean()), n=n)
    notes.append("robust_accuracy is ADAPTIVE: per-sample worst case of the paired attack re-run on the defended "
                 "system, the strong adaptive suite where it ran, and the transferred examples "
                 "(robust_accuracy_paired_adaptive: the paired attack's re-run alone; robust_accuracy_adaptive_only: "
                 "every adaptive attack without the transferred examples); "
                 "robust_accuracy_nonadaptive uses the examples crafted on the undefended model; "
                 "defended = rejected or classified correctly; the adaptive confusion matrix shows, per sample, "
                 "the decision on the example of the first of these attacks that broke it")
    return x_eval, defended_ad


def _combined_score(system: SecurePipeline, x: torch.Tensor) -> torch.Tensor:
    """One detection score: the largest detector score in units of its clean spread above its threshold."""
    return torch.stack([(d.score(x).to(x.device) - d.threshold_) / d.score_scale_ for d in system.detectors]).amax(0)


def detection_metrics(system: SecurePipeline, clean_val: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      x_adv: torch.Tensor) -> dict[str, Any]:
    """TPR at thresholds set on held-out clean validation images for 1% and 5% FPR, FPR on the clean eval images,
    and AUROC; positives are the adversarial examples that fool the classifier behind the detectors."""
    s_val = _combined_score(system, clean_val).cpu()
    s_clean, s_adv = _combined_score(system, x).cpu(), _combined_score(system, x_adv).cpu()
    pos = system.decide(x_adv, with_detectors=False).labels.cpu() != y.cpu()
    out: dict[str, Any] = {}
    for pct in (1, 5):
        t = float(torch.quantile(s_val.double(), 1 - pct / 100, interpolation="higher"))
        out[f"tpr_at_fpr_{pct}pct"] = proportion(int((s_adv[pos] > t).sum()), int(pos.sum()))
        out[f"fpr_at_fpr_{pct}pct"] = proportion(int((s_clean > t).sum()), len(s_clean))
    out["tpr"] = proportion(int((s_adv[pos] > 0).sum()), int(pos.sum()))  # at each detector's own threshold
    out["fpr"] = proportion(int((s_clean > 0).sum()), len(s_clean))
    out["auroc"] = scalar(auroc(s_clean, s_adv[pos]), n=int(pos.sum()) + len(s_clean))
    return out


def _certification(system: SecurePipeline, st: EvasionState, metrics: dict, notes: list[str]) -> None:
    cert = system.certifier
    counts = cert.certified_accuracy(st.x, st.y, RADII)
    metrics["certified_accuracy"] = {f"radius_{r:g}": proportion(k, m) for r, (k, m) in counts.items()}
    notes.append(f"certified L2 accuracy: Cohen et al. CERTIFY with n0={cert.n0}, n={cert.n}, alpha={cert.alpha} "
                 f"(Clopper-Pearson), sigma={cert.sigma}; the deployed decision is PREDICT with n={cert.n}, "
                 f"alpha={cert.alpha}")
    if st.spec.get("params", {}).get("norm", "linf") == "linf":
        notes.append("the certificate is for L2; an L-inf eps ball has L2 radius up to eps * sqrt(d)")


# ---------------------------------------------------------------------------------------------- the handler

@defense_evaluator("preprocessor", "evasion")
@defense_evaluator("postprocessor", "evasion")
@defense_evaluator("detector", "evasion")
@defense_evaluator("trainer", "evasion")
@defense_evaluator("certifier", "evasion")
@defense_evaluator("pipeline", "evasion")
def evaluate_evasion_defense(ctx: RunContext, spec: DefenseSpec, components: list[Any], outcome: AttackOutcome
                             ) -> dict[str, Any]:
    """A defended system (preprocessors, detectors, trainer, certifier, postprocessors) against an evasion attack:
    clean accuracy, the attack's examples made on the baseline, and the attack re-run adaptively on the system."""
    t_start = time.perf_counter()
    st = EvasionState.from_state(outcome.state, ctx.device)
    attack_id = outcome.entry.get("id", st.spec["name"])
    notes: list[str] = []
    metrics: dict[str, Any] = {}
    system = build_system(ctx, components, metrics, notes)
    decisions = {"clean": _clean_metrics(ctx, system, st.x, st.y, metrics)}
    x_eval, defended = _robustness(ctx, system, st, metrics, notes, decisions)
    if system.detectors:
        clean_val = ctx.splits.val.x[1::2].to(ctx.device)
        metrics["detection"] = detection_metrics(system, clean_val, st.x, st.y, st.x_adv)
        metrics["detection_adaptive"] = detection_metrics(system, clean_val, st.x, st.y, x_eval)
        notes.append("detection: thresholds for 1%/5% FPR set on the other half of the clean validation split; "
                     "tpr over the adversarial examples that fool the classifier; "
                     "'tpr'/'fpr' at each detector's own calibrated threshold")
    if system.certifier is not None and system.certifier.randomized:
        _certification(system, st, metrics, notes)
    elif system.certifier is not None:
        interval_certification(system.certifier, st, defended, metrics, notes)
    entry: dict[str, Any] = {
        "id": spec.key, "name": spec.name or "pipeline",
        "components": [{"kind": c.registry_kind, "name": c.registry_name, "params": registry.creation_params(c)}
                       for c in components],
        "metrics": metrics, "notes": notes, "artifacts": {}, "time_s": time.perf_counter() - t_start,
        "confusion_evasion": evasion_confusions(decisions, st.y, ctx.splits.train.num_classes),
    }
    entry["system"] = save_system(ctx, system, name=f"{spec.key}-vs-{attack_id}", trainer=_trainer_spec(components),
                                  metrics=metrics, against=attack_id, attack_params=st.spec.get("params", {}))
    if ctx.profile.output.figures:
        path = ctx.artifact_dir("defenses") / f"{spec.key}_vs_{attack_id}.png"
        bar_figure(path, {"clean": metrics["clean_accuracy"]["value"],
                           "non-adaptive": metrics["robust_accuracy_nonadaptive"]["value"],
                           "adaptive": metrics["robust_accuracy"]["value"]},
                    title=f"{spec.key} vs {attack_id}: accuracy of the defended system")
        entry["artifacts"]["accuracy: clean vs non-adaptive vs adaptive attack"] = ctx.rel(path)
    return entry


def _trainer_spec(components: Sequence[Any]) -> dict[str, Any] | None:
    """The trainer whose ``architecture`` the deployed weights need (the certifier keeps the baseline's)."""
    kinds = {c.registry_kind for c in components}
    if "certifier" in kinds:
        return None
    for c in components:
        if c.registry_kind == "trainer":
            return {"name": c.registry_name, "params": registry.creation_params(c)}
    return None
