"""Evaluate evasion defenses (preprocessors, detectors, robust trainers, certifiers, postprocessors, and layered
pipelines of them) against one evasion attack outcome, adaptively.

The defended system is the components in profile order (input side first) around the model: preprocessors ->
detectors (which reject) -> the model (robustly trained when a trainer is listed, a noise-trained base classifier
under randomized smoothing when a certifier is listed) -> postprocessors. An input counts as defended when it is
rejected or classified correctly. Two robust accuracies are reported, labelled:

- ``robust_accuracy_nonadaptive``: the attack outcome's examples (crafted on the undefended baseline) sent through
  the defended system;
- ``robust_accuracy`` (adaptive): the same attack re-run on the defended system, with gradients through
  differentiable preprocessors, BPDA through the others, EOT over randomized ones, straight-through
  postprocessors, and, when detectors are present, additionally a detector-aware PGD (fool the classifier and keep
  every detector under its threshold); a sample counts as defended only if it survives every adaptive attack.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Sequence

import torch
from torch import nn

from safedl import registry
from safedl.assess.context import RunContext
from safedl.assess.handlers import AttackOutcome, defense_handler
from safedl.defenses.adaptive import BPDA, DetectorAwarePGD, defended_model
from safedl.defenses.detect._base import auroc
from safedl.defenses.preprocess._base import Preprocessor
from safedl.defenses.preprocess.gaussian_augmentation import GaussianAugmentation
from safedl.profile import DefenseSpec
from safedl.utils.stats import proportion, scalar
from safedl.utils.tensors import eval_mode, predict

log = logging.getLogger(__name__)
RADII = (0.0, 0.25, 0.5, 1.0, 1.5)
N_DETECTOR_FIT = 2000


class _Preprocessed:
    """A detector that sees the output of the preprocessors in front of it (BPDA through non-differentiable ones)."""

    def __init__(self, detector: Any, pre: Sequence[nn.Module]):
        self.d = detector
        self.real = nn.Sequential(*pre)
        self.adaptive = nn.Sequential(*[p if getattr(p, "differentiable", True) else BPDA(p) for p in pre])
        self.threshold_ = detector.threshold_
        self.score_scale_ = detector.score_scale_

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.d.score(self.real(x))

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        return self.d.score_torch(self.adaptive(x))

    def threshold_at(self, fpr: float) -> float:
        return self.d.threshold_at(fpr)


class _System:
    """The deployed defended system: classify and reject."""

    def __init__(self, pre, model, post, detectors, certifier, batch_size):
        self.pre, self.model, self.post, self.detectors, self.certifier = pre, model, post, detectors, certifier
        self.deployed = defended_model(pre, model, post, adaptive=False)
        self.batch_size = batch_size

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted labels, rejected mask); a certifier's abstention counts as a rejection."""
        if self.certifier is not None:
            pred = self.certifier.predict(x, n=self.certifier.n0).to(x.device)
            rejected = pred < 0
        else:
            with eval_mode(self.deployed):
                pred = predict(self.deployed, x, batch_size=self.batch_size)
            rejected = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for d in self.detectors:
            rejected |= (d.score(x) > d.threshold_).to(x.device)
        return pred, rejected

    def scores(self, x: torch.Tensor) -> torch.Tensor | None:
        """One detection score: the largest detector score in units of its clean spread above its threshold."""
        if not self.detectors:
            return None
        return torch.stack([(d.score(x).to(x.device) - d.threshold_) / d.score_scale_ for d in self.detectors]).amax(0)


def _split(components: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ("preprocessor", "detector", "trainer", "certifier", "postprocessor")}
    for c in components:
        out[getattr(c, "registry_kind")].append(c)
    return out


def _train(ctx: RunContext, spec: DefenseSpec, fitter: Any, what: str) -> tuple[nn.Module, float, bool]:
    """Train (or reload from the stage folder) a fresh baseline-architecture model with ``fitter``."""
    folder = ctx.stage_dir("defense-models", f"{spec.key}-{what}".replace("/", "_"))
    ckpt, meta = folder / "model.pt", folder / "train.json"
    model = ctx.build_model()
    if ckpt.exists() and meta.exists():
        model.load_state_dict(torch.load(ckpt, map_location=ctx.device))
        return model.eval(), float(json.loads(meta.read_text())["time_s"]), True
    t0 = time.perf_counter()
    fitter.fit(model, ctx.splits.train, recipe=ctx.recipe, seed=ctx.seed, device=ctx.device, val=ctx.splits.val)
    elapsed = time.perf_counter() - t0
    torch.save(model.state_dict(), ckpt)
    meta.write_text(json.dumps({"time_s": elapsed}))
    return model.eval(), elapsed, False


def _run_batched(fn, x, y, target, bs):
    return torch.cat([fn(x[i:i + bs], y[i:i + bs], None if target is None else target[i:i + bs])
                      for i in range(0, len(x), bs)])


def _detection(system: _System, clean_val: torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
               ) -> dict[str, Any]:
    """TPR at thresholds set on held-out clean validation images for 1% and 5% FPR, FPR on the clean eval images,
    and AUROC; positives are the adversarial examples that fool the classifier behind the detectors."""
    s_val = system.scores(clean_val).cpu()
    s_clean, s_adv = system.scores(x).cpu(), system.scores(x_adv).cpu()
    pred_adv, _ = _classify_only(system, x_adv)
    pos = (pred_adv.cpu() != y.cpu())
    out: dict[str, Any] = {}
    for pct in (1, 5):
        t = float(torch.quantile(s_val.double(), 1 - pct / 100, interpolation="higher"))
        out[f"tpr_at_fpr_{pct}pct"] = proportion(int((s_adv[pos] > t).sum()), int(pos.sum()))
        out[f"fpr_at_fpr_{pct}pct"] = proportion(int((s_clean > t).sum()), len(s_clean))
    out["tpr"] = proportion(int((s_adv[pos] > 0).sum()), int(pos.sum()))  # at each detector's own threshold
    out["fpr"] = proportion(int((s_clean > 0).sum()), len(s_clean))
    out["auroc"] = scalar(auroc(s_clean, s_adv[pos]), n=int(pos.sum()) + len(s_clean))
    return out


def _classify_only(system: _System, x: torch.Tensor):
    saved, system.detectors = system.detectors, []
    try:
        return system.decide(x)
    finally:
        system.detectors = saved


def _bar_figure(path, values: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.8))
    names = list(values)
    ax.bar(names, [values[k] for k in names], color=["#7a9", "#c66", "#69c"][: len(names)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    for i, k in enumerate(names):
        ax.text(i, values[k] + 0.02, f"{values[k]:.2f}", ha="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@defense_handler("preprocessor", "evasion")
@defense_handler("postprocessor", "evasion")
@defense_handler("detector", "evasion")
@defense_handler("trainer", "evasion")
@defense_handler("certifier", "evasion")
@defense_handler("pipeline", "evasion")
def evaluate_evasion_defense(ctx: RunContext, spec: DefenseSpec, components: list[Any], outcome: AttackOutcome
                             ) -> dict[str, Any]:
    t_start = time.perf_counter()
    parts = _split(components)
    st = outcome.state
    dev = ctx.device
    x, y, x_adv = st["x"].to(dev), st["y"].to(dev), st["x_adv"].to(dev)
    target = None if st.get("target") is None else st["target"].to(dev)
    aspec = st["spec"]
    bs = ctx.profile.evaluation.batch_size
    notes: list[str] = []
    metrics: dict[str, Any] = {}

    # -- the model behind the defense ------------------------------------------------------------------------
    model, train_time = ctx.baseline, None
    certifier = parts["certifier"][0] if parts["certifier"] else None
    if certifier is not None:
        model, train_time, cached = _train(ctx, spec, certifier, "smoothing-base")
        certifier.with_model(model)
        notes.append(f"randomized smoothing: base model trained with Gaussian noise sigma={certifier.sigma} "
                     f"(baseline recipe and seed){' (reloaded)' if cached else ''}; abstentions count as rejections")
    elif parts["trainer"]:
        trainer = parts["trainer"][0]
        model, train_time, cached = _train(ctx, spec, trainer, trainer.registry_name)
        epochs = getattr(trainer, "epochs", None)
        notes.append(f"{trainer.registry_name}: a fresh model trained with the baseline recipe and seed"
                     + (f", except epochs={epochs} (the trainer's override)" if epochs is not None else "")
                     + (" (reloaded from the stage folder)" if cached else ""))
    if len(parts["trainer"]) > 1 or (certifier is not None and parts["trainer"]):
        notes.append("only one model-training component is used (the certifier, else the first trainer)")
    if train_time is not None:
        metrics["training_time_s"] = scalar(train_time)

    pre, post = parts["preprocessor"], parts["postprocessor"]
    detectors = []
    for d in parts["detector"]:
        xf = ctx.splits.train.x[:N_DETECTOR_FIT].to(dev)
        with torch.no_grad():
            xf = nn.Sequential(*pre)(xf) if pre else xf
        # calibrate on half of the validation split; the other half sets the 1%/5% thresholds of the metrics
        x_val = ctx.splits.val.x.to(dev)
        with torch.no_grad():
            x_cal = nn.Sequential(*pre)(x_val[::2]) if pre else x_val[::2]
        d.fit(xf, model=model, y=ctx.splits.train.y[:N_DETECTOR_FIT].to(dev), x_calibration=x_cal, seed=ctx.seed)
        detectors.append(_Preprocessed(d, pre))
        notes.append(f"{d.registry_name}: fitted on {N_DETECTOR_FIT} clean training images, threshold calibrated "
                     f"for {d.fpr:.0%} clean FPR on {len(x_cal)} clean validation images")
    system = _System(pre, model, post, detectors, certifier, bs)

    # -- clean cost and latency ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    pred, rej = system.decide(x)
    t_def = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_pred = predict(ctx.baseline, x, batch_size=bs)
    t_base = time.perf_counter() - t0
    n = len(y)
    metrics["clean_accuracy"] = proportion(int(((pred == y) & ~rej).sum()), n)
    metrics["clean_accuracy_undefended"] = proportion(int((base_pred == y).sum()), n)
    if detectors or certifier is not None:
        metrics["clean_rejection_rate"] = proportion(int(rej.sum()), n)
    metrics["latency_added_ms_per_image"] = scalar(1000 * (t_def - t_base) / max(1, n), n=n)

    # -- non-adaptive: the outcome's examples, made on the undefended baseline -----------------------------
    pred_na, rej_na = system.decide(x_adv)
    defended_na = rej_na | (pred_na == y)
    metrics["robust_accuracy_nonadaptive"] = proportion(int(defended_na.sum()), n)

    # -- adaptive: the same attack re-run on the defended system ---------------------------------------------
    attack = registry.create("evasion", aspec["name"], **aspec.get("params", {}))
    white_box = getattr(attack, "access", "white-box") == "white-box"
    if certifier is not None:
        # EOT over the smoothing noise (unclipped, exactly the noise the certificate is about)
        noise = GaussianAugmentation(sigma=certifier.sigma, clip=False, seed=ctx.seed)
        target_model = defended_model([noise], model, post, adaptive=True, eot_samples=16)
        notes.append("adaptive: attack on the smoothed classifier through EOT over 16 Gaussian draws per step")
    else:
        target_model = defended_model(pre, model, post, adaptive=white_box, eot_samples=8)
        if white_box:
            how = [f"{p.registry_name}: {'gradients' if p.differentiable else 'BPDA'}{' + EOT(8)' if p.randomized else ''}"
                   for p in pre]
            how += [f"{q.registry_name}: straight-through" for q in post]
            notes.append("adaptive white-box attack on the defended system" + (f" ({'; '.join(how)})" if how else ""))
        else:
            notes.append(f"adaptive: the {attack.access} attack queries the deployed defended system")
    if hasattr(attack, "fit"):
        attack.fit(ctx.splits.train, model=defended_model(pre, model, post, adaptive=False), device=dev)
    x_ad = _run_batched(lambda a, b, t: attack(target_model, a, b, target=t), x, y, target, bs)
    pred_ad, rej_ad = system.decide(x_ad)
    defended_ad = rej_ad | (pred_ad == y)
    if white_box and certifier is None and any(not p.differentiable and type(p).approximation
                                               is not Preprocessor.approximation for p in pre):
        # a smooth surrogate can have vanishing gradients: also try BPDA with the identity, keep the worst case
        ident = defended_model(pre, model, post, adaptive=True, eot_samples=8, bpda="identity")
        x_id = _run_batched(lambda a, b, t: attack(ident, a, b, target=t), x, y, target, bs)
        p_id, r_id = system.decide(x_id)
        defended_ad &= r_id | (p_id == y)
        notes.append("adaptive: BPDA through each preprocessor's differentiable approximation and BPDA with the "
                     "identity, per-sample worst case")
    x_ad_det = None
    if detectors and not (getattr(attack, "bounded", True) and getattr(attack, "eps", 0) > 0):
        notes.append(f"{aspec['name']} has no eps budget, so no detector-aware PGD was run (only {aspec['name']} "
                     "on the defended classifier): the adaptive number may overstate robustness")
    elif detectors:
        dpgd = DetectorAwarePGD(eps=attack.eps, norm=attack.norm, steps=max(40, int(getattr(attack, "steps", 40))),
                                seed=ctx.seed)
        clf = defended_model(pre, model, post, adaptive=True)
        x_ad_det = _run_batched(lambda a, b, t: dpgd(clf, detectors, a, b, target=t), x, y, target, bs)
        p2, r2 = system.decide(x_ad_det)
        defended_ad &= r2 | (p2 == y)
        notes.append(f"adaptive on detectors: detector-aware PGD ({dpgd.steps} steps, eps {dpgd.eps} {dpgd.norm}: "
                     "classification margin + hinge on every detector score above its threshold); a sample is "
                     f"defended only if it survives both this and {aspec['name']} on the defended classifier")
    metrics["robust_accuracy_adaptive_only"] = proportion(int(defended_ad.sum()), n)
    # the adaptive attacker may also submit the transferred examples: the reported number is the worst case
    defended_ad &= defended_na
    metrics["robust_accuracy"] = proportion(int(defended_ad.sum()), n)
    metrics["robust_accuracy_gap"] = scalar(float(defended_na.float().mean() - defended_ad.float().mean()), n=n)
    notes.append("robust_accuracy is ADAPTIVE: per-sample worst case of the attack re-run on the defended system "
                 "and the transferred examples (robust_accuracy_adaptive_only: the re-run alone); "
                 "robust_accuracy_nonadaptive uses the examples crafted on the undefended model; "
                 "defended = rejected or classified correctly")

    # -- detection --------------------------------------------------------------------------------------------
    if detectors:
        clean_val = ctx.splits.val.x[1::2].to(dev)
        metrics["detection"] = _detection(system, clean_val, x, y, x_adv)
        metrics["detection_adaptive"] = _detection(system, clean_val, x, y, x_ad if x_ad_det is None else x_ad_det)
        notes.append("detection: thresholds for 1%/5% FPR set on the other half of the clean validation split; "
                     "tpr over the adversarial examples that fool the classifier; "
                     "'tpr'/'fpr' at each detector's own calibrated threshold")

    # -- certification ----------------------------------------------------------------------------------------
    if certifier is not None:
        cert = certifier.certified_accuracy(x, y, RADII)
        metrics["certified_accuracy"] = {f"radius_{r:g}": proportion(k, m) for r, (k, m) in cert.items()}
        notes.append(f"certified L2 accuracy: Cohen et al. CERTIFY with n0={certifier.n0}, n={certifier.n}, "
                     f"alpha={certifier.alpha} (Clopper-Pearson), sigma={certifier.sigma}")
        if getattr(attack, "norm", "linf") == "linf":
            notes.append("the certificate is for L2; an L-inf eps ball has L2 radius up to eps * sqrt(d)")

    entry: dict[str, Any] = {
        "id": spec.key, "name": spec.name or "pipeline",
        "components": [{"kind": c.registry_kind, "name": c.registry_name,
                        "params": c.params() if hasattr(c, "params") else {}} for c in components],
        "metrics": metrics, "notes": notes, "artifacts": {}, "time_s": time.perf_counter() - t_start,
    }
    if ctx.profile.output.figures:
        path = ctx.artifact_dir("defenses") / f"{spec.key}_vs_{outcome.entry.get('id', aspec['name'])}.png"
        _bar_figure(path, {"clean": metrics["clean_accuracy"]["value"],
                           "non-adaptive": metrics["robust_accuracy_nonadaptive"]["value"],
                           "adaptive": metrics["robust_accuracy"]["value"]})
        entry["artifacts"]["accuracy: clean vs non-adaptive vs adaptive attack"] = ctx.rel(path)
    return entry
